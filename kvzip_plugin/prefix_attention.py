# SPDX-License-Identifier: Apache-2.0
"""Attention of requests on a compacted prefix whose KV heads keep runs of different lengths.

A layer's attention for such a request is split in two parts merged by log-sum-exp (exactly the
softmax over their union):

* the prefix part: every KV head over its own run of kept pairs (no mask inside the run: all of it
  precedes the request). All requests of a step on the same prefix share one pass over the runs
  (their queries are stacked), so the shared prefix is read once per step (the cascade idea);
* the request part: its own tokens, causal (read from the engine's pages as usual).

Keys carry their RoPE rotation from their original positions, so neither part needs positions.
Shapes follow the engines: queries `[n, H_q, D]` with query head `j` on KV head `j // G`, `G =
H_q / H_kv`. Results are float32.

Each part is one fused attention call (`attend`): on CPU torch's flash-attention kernel, which
returns the log-sum-exp the merge needs, so a layer costs a handful of torch ops whatever the
number of KV heads (a decode step of a small model is bound by per-op overhead, not by flops).
Decode rows (one query each) alone take the two parts in ONE softmax instead, with no merge: over pages
(`page_decode_attention`) or over runs one after another (`segment_decode_attention`, two GEMMs per KV head:
what many requests on one prefix pay off with). Padding (a short request's own tokens up to the longest) is
masked and must hold finite numbers: callers fill it with copies of real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_NEG_INF = float("-inf")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of each query's scores.

    Args:
        q: `[B, H, M, D]`; k, v: `[B, H, T, D]` (T >= 1, finite everywhere, masked or not).
        mask: additive float mask broadcastable to `[B, H, M, T]` (0 attend, -inf not), or None.

    Returns:
        out `[B, H, M, D]` float32 and lse `[B, H, M]` float32. A query that attends to nothing gets
        out 0 and an undefined lse: callers set its lse to -inf (`run_attention` does).
    """
    if q.device.type == "cpu":
        # the CPU flash kernel reads the last dimension as contiguous whatever its stride (wrong results,
        # no error, for e.g. vLLM CPU's keys, stored transposed): hand it such copies where needed
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=None if mask is None else mask.to(q.dtype), scale=scale)
        return out.float(), lse.float()
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.float()
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    return torch.matmul(p, v.float()), lse


def length_mask(lengths: torch.Tensor, t: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[n]` lengths -> additive mask `[n, 1, 1, t]`: 0 on the first `lengths[i]` keys of row i, -inf after."""
    valid = torch.arange(t, device=lengths.device).view(1, 1, 1, t) < lengths.view(-1, 1, 1, 1)
    return torch.zeros(valid.shape, dtype=dtype, device=lengths.device).masked_fill_(~valid, _NEG_INF)


def own_positions(lengths: torch.Tensor) -> torch.Tensor:
    """`[R]` own-token counts (>= 1) -> `[R, max]` positions to gather them padded to the longest: a
    short request repeats its last token (a real, finite pair that `decode_attention` masks)."""
    t = torch.arange(int(lengths.max()), device=lengths.device)
    return torch.minimum(t.view(1, -1), (lengths - 1).view(-1, 1))


def _group(q: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """`[n, H_q, D]` -> `[H_kv, 1, G * n, D]` (rows g-major within each KV head)."""
    n, h_q, d = q.shape
    g = h_q // n_kv_heads
    return q.view(n, n_kv_heads, g, d).permute(1, 2, 0, 3).reshape(n_kv_heads, 1, g * n, d)


def _ungroup(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `_group` for outputs `[H_kv, 1, G * n, ...]` -> `[n, H_q, ...]`."""
    h_kv = x.shape[0]
    rest = x.shape[3:]
    g = x.shape[2] // n
    return x.reshape(h_kv, g, n, *rest).permute(2, 0, 1, *range(3, 3 + len(rest))).reshape(n, h_kv * g, *rest)


def segment_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: list[int],
                      lengths: list[int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries over every KV head's own run, the runs lying one after another in `keys`/`values`.

    Args:
        q: `[n, H_q, D]` queries (all requests of the step on this prefix, stacked).
        keys, values: `[N, D]`; KV head `h`'s run is rows `[starts[h], starts[h] + lengths[h])`.
        starts, lengths: `H_kv` ints each.
        scale: softmax scale.

    Returns:
        out `[n, H_q, D]` float32, lse `[n, H_q]` float32 (-inf for a head whose run is empty).

    One fused attention call per KV head over exactly its run (no padding: `pair` runs are very uneven,
    the longest can be the whole prefix while most are short).
    """
    n, h_q, d = q.shape
    h_kv = len(lengths)
    g = h_q // h_kv
    qg = _group(q, h_kv)  # [H_kv, 1, G*n, D]
    outs, lses = [], []
    for h in range(h_kv):
        s, t = int(starts[h]), int(lengths[h])
        if t == 0:
            outs.append(torch.zeros((1, 1, g * n, d), dtype=torch.float32, device=q.device))
            lses.append(torch.full((1, 1, g * n), _NEG_INF, dtype=torch.float32, device=q.device))
            continue
        o, m = attend(qg[h:h + 1], keys[s:s + t].view(1, 1, t, d), values[s:s + t].view(1, 1, t, d), None, scale)
        outs.append(o)
        lses.append(m)
    return _ungroup(torch.cat(outs), n), _ungroup(torch.cat(lses), n)


def _page_scores(qg: torch.Tensor, chunks, top: torch.Tensor, scale: float | None) -> list[torch.Tensor]:
    """Each chunk's scores `[P, G*n, page]` of its pages for their heads' query rows `qg[heads]` (`qg`
    `[H_kv, G*n, D]`, float32), times `scale` (None: `qg` is scaled already), masked; raises `top`
    `[H_kv, G*n]` to each head's max over them (in place)."""
    rows = qg.shape[1]
    scores = []
    for keys, _, heads, mask in chunks:
        s = torch.matmul(qg[heads], keys.float().transpose(1, 2))  # [P, G*n, page]
        if scale is not None:
            s = s * scale if mask is None else torch.addcmul(mask.view(-1, 1, keys.shape[1]), s, torch.tensor(scale))
        elif mask is not None:
            s = s + mask.view(-1, 1, keys.shape[1])
        top.scatter_reduce_(0, heads.view(-1, 1).expand(-1, rows), s.amax(-1), "amax")
        scores.append(s)
    return scores


def _page_sums(chunks, scores: list[torch.Tensor], top: torch.Tensor, den: torch.Tensor, num: torch.Tensor) -> None:
    """Add each head's softmax numerators over its pages to `num` `[H_kv, G*n, D]` and their sums to `den`
    `[H_kv, G*n]` (in place), relative to the heads' max `top`."""
    for (_, values, heads, _), s in zip(chunks, scores, strict=True):
        e = torch.exp(s - top[heads].unsqueeze(-1))
        den.index_add_(0, heads, e.sum(-1))
        num.index_add_(0, heads, torch.matmul(e, values.float()))  # [P, G*n, D]


def page_attention(q: torch.Tensor, chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]],
                   n_kv_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries over every KV head's own run, the runs given page by page (engines with pages of many tokens).

    Args:
        q: `[n, H_q, D]` queries (all requests of the step on this prefix, stacked).
        chunks: `(keys [P, page, D], values, heads [P], mask)`: pages (any strides) and the KV head each
            belongs to, e.g. one chunk per engine buffer; `mask` `[P, 1, 1, page]` additive for pages not
            all valid, or None.
        n_kv_heads: H_kv.

    Returns:
        out `[n, H_q, D]` float32, lse `[n, H_q]` float32 (-inf and 0 for a head without pages).

    Every page is attended by its head's queries with batched matmuls over the pages as they lie (no
    copy of the keys into runs), then each head's softmax is formed over all its pages (a per-head max,
    sums added per head). A layer costs a dozen torch ops whatever H_kv and the run lengths.
    """
    n, h_q, d = q.shape
    qg = _group(q, n_kv_heads).squeeze(1).float()  # [H_kv, G*n, D]
    rows = qg.shape[1]
    top = torch.full((n_kv_heads, rows), _NEG_INF, dtype=torch.float32, device=q.device)
    scores = _page_scores(qg, chunks, top, scale)
    den = torch.zeros_like(top)
    num = torch.zeros((n_kv_heads, rows, d), dtype=torch.float32, device=q.device)
    _page_sums(chunks, scores, top, den, num)
    out = num / den.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)  # a head without pages: 0
    lse = top + torch.log(den)  # -inf for a head without pages
    return _ungroup(out.unsqueeze(1), n), _ungroup(lse.unsqueeze(1), n)


def _own_scores(qs: torch.Tensor, own_k_t: torch.Tensor, own_mask: torch.Tensor, n_kv_heads: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode rows' scores over their own tokens: `qs` `[n, H_q, D]` scaled float32 queries, `own_k_t`
    `[n, H_kv, D, T]`, `own_mask` `[n, 1, 1, T]` -> scores `[n, H_kv, G, T]` and their max per row `[H_kv, G*n]`
    (rows g-major, as `_group`), the start of the one-softmax decode paths' running max."""
    n, h_q, d = qs.shape
    g = h_q // n_kv_heads
    so = torch.matmul(qs.view(n, n_kv_heads, g, d), own_k_t.float()).add_(own_mask)
    return so, so.amax(-1).permute(1, 2, 0).reshape(n_kv_heads, g * n)


def _own_sums(so: torch.Tensor, top: torch.Tensor, own_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The own tokens' softmax sums `[H_kv, G*n]` and numerators `[H_kv, G*n, D]` relative to the rows' final max
    `top` (`so` of `_own_scores`, overwritten), which the prefix part then adds to."""
    n, h_kv, g, _ = so.shape
    eo = torch.exp(so.sub_(top.view(h_kv, g, n).permute(2, 0, 1).unsqueeze(-1)))  # [n, H_kv, G, T]
    den = eo.sum(-1).permute(1, 2, 0).reshape(h_kv, g * n)
    num = torch.matmul(eo, own_v.float()).permute(1, 2, 0, 3).reshape(h_kv, g * n, own_v.shape[-1])
    return den, num


def page_decode_attention(q: torch.Tensor, chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                torch.Tensor | None]],
                          n_kv_heads: int, own_k: torch.Tensor, own_v: torch.Tensor, own_mask: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """Decode rows over every KV head's run (given page by page) and their own tokens, as ONE softmax.

    Args:
        q: `[n, H_q, D]` one query per request (all requests of the step on this prefix).
        chunks: the runs' pages as `page_attention` takes them.
        n_kv_heads: H_kv.
        own_k, own_v: `[n, H_kv, T, D]` each request's own tokens (padding finite), any strides.
        own_mask: `[n, 1, 1, T]` additive (0 on a request's own tokens, -inf on padding; every request
            has at least one own token, its newest).

    Returns:
        out `[n, H_q, D]` float32: what `page_attention` and `decode_attention` merged by `merge` give,
        computed without the two parts' normalizations and the merge (a decode step of a small model is
        bound by the count of torch ops per layer: this is about two thirds of theirs). The own tokens
        give every row a finite max, so no row is empty.
    """
    n = q.shape[0]
    qs = q.float() * scale
    qg = _group(qs, n_kv_heads).squeeze(1)  # [H_kv, G*n, D]
    so, top = _own_scores(qs, own_k.transpose(-1, -2), own_mask, n_kv_heads)
    scores = _page_scores(qg, chunks, top, None)
    den, num = _own_sums(so, top, own_v)
    _page_sums(chunks, scores, top, den, num)
    return _ungroup((num / den.unsqueeze(-1)).unsqueeze(1), n)


def segment_decode_attention(q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, starts: list[int],
                             lengths: list[int], own_k_t: torch.Tensor, own_v: torch.Tensor, own_mask: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """Decode rows over every KV head's run (the runs one after another) and their own tokens, as ONE softmax:
    the cascade for many requests on one prefix.

    Args:
        q: `[n, H_q, D]` one query per request (all decode requests of the step on this prefix).
        keys_t: `[D, N]` the runs' keys as columns (KV head `h`'s run is columns `[starts[h], starts[h] +
            lengths[h])`): the form a GEMM reads without a transpose, and the one vLLM's CPU pages hold.
        values: `[N, D]`, rows as `keys_t`'s columns.
        own_k_t: `[n, H_kv, D, T]` each request's own keys as columns; own_v `[n, H_kv, T, D]` (padding finite).
        own_mask: `[n, 1, 1, T]` additive (0 on a request's own tokens, -inf on padding; every request has at
            least one own token, its newest).

    Returns:
        out `[n, H_q, D]` float32.

    Each run is read once for all `G * n` query rows of its KV head (two GEMMs over it), where a per-request
    kernel reads it once per request: with many requests that is the difference between a run served from
    the core's cache and one streamed again for every request. One exponential per score, no merge.
    """
    n = q.shape[0]
    h_kv = len(lengths)
    qs = q.float() * scale
    so, top = _own_scores(qs, own_k_t, own_mask, h_kv)
    qg = _group(qs, h_kv).squeeze(1)  # [H_kv, G*n, D]
    scores: list[torch.Tensor | None] = []
    for h in range(h_kv):
        s0, t = int(starts[h]), int(lengths[h])
        if t == 0:
            scores.append(None)
            continue
        s = torch.matmul(qg[h], keys_t[:, s0:s0 + t].float())  # [G*n, t] (a half / bf16 pool: its run in float32)
        torch.maximum(top[h], s.amax(-1), out=top[h])
        scores.append(s)
    den, num = _own_sums(so, top, own_v)
    for h, s in enumerate(scores):
        if s is None:
            continue
        e = s.sub_(top[h].unsqueeze(-1)).exp_()
        den[h] += e.sum(-1)
        s0, t = int(starts[h]), int(lengths[h])
        num[h].addmm_(e, values[s0:s0 + t].float())
    return _ungroup(num.div_(den.unsqueeze(-1)).unsqueeze(1), n)


PAGE_ROWS_MAX = 16
"""`PageRuns` attends page by page while each KV head has at most this many query rows (G x requests):
the pages' partial outputs then cost less than copying the pages into runs; with more rows (many
requests sharing the prefix) the runs are copied and each head attends over its run in one call."""


@dataclass(frozen=True)
class PageRuns:
    """A layer's runs as the engine's pages (`page_attention`), with where each page falls in the runs.

    Attributes:
        chunks: `page_attention`'s `(keys [P, page, D], values, heads [P], mask)`: one per buffer, or one
            for all (a layer's pages may lie in many buffers; every chunk costs the attention its own ops).
        rows: per chunk, `[P]` the positions of its pages in the layer's head-major page order.
        starts, lengths: each KV head's run in the pages taken in that order (`segment_attention`).
        head_major: one chunk whose pages are in that order already (`runs` needs no reordering).
    """

    chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]
    rows: list[torch.Tensor]
    starts: list[int]
    lengths: list[int]
    head_major: bool = False

    def attention(self, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        h_kv = len(self.lengths)
        if not self.chunks or q.shape[0] * (q.shape[1] // h_kv) <= PAGE_ROWS_MAX:
            return page_attention(q, self.chunks, h_kv, scale)
        keys, values = self.runs()
        return segment_attention(q, keys, values, self.starts, self.lengths, scale)

    def decode_attention(self, q: torch.Tensor, own: OwnTokens, scale: float) -> torch.Tensor | None:
        """Decode rows' whole attention (runs and own tokens, `page_decode_attention`) when they are
        few enough to attend page by page; None otherwise (the caller takes the two-part path)."""
        h_kv = len(self.lengths)
        if q.shape[0] * (q.shape[1] // h_kv) > PAGE_ROWS_MAX:
            return None
        return page_decode_attention(q, self.chunks, h_kv, own.keys, own.values, own.mask, scale)

    def runs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pages copied one after another: `[N, D]` keys and values."""
        k0 = self.chunks[0][0]
        ps, d = k0.shape[1], k0.shape[2]
        if self.head_major:
            return self.chunks[0][0].reshape(-1, d), self.chunks[0][1].reshape(-1, d)
        n = sum(int(r.numel()) for r in self.rows)
        out_k, out_v = k0.new_empty((n, ps, d)), k0.new_empty((n, ps, d))
        for (k, v, _, _), rows in zip(self.chunks, self.rows, strict=True):
            out_k[rows] = k
            out_v[rows] = v
        return out_k.view(n * ps, d), out_v.view(n * ps, d)


@dataclass(frozen=True)
class OwnTokens:
    """The own tokens of a step's decode rows on one prefix, gathered once per layer.

    Attributes:
        keys, values: `[R, H_kv, T, D]`, padded to the longest with finite numbers (`own_positions`).
        lengths: `[R]` own tokens of each request (>= 1).
        mask: `[R, 1, 1, T]` additive mask of the padding (`length_mask(lengths, T)`): the same for every
            layer of a step, so the glue builds it once per step.
    """

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> OwnTokens:
        return cls(keys, values, lengths, length_mask(lengths.to(keys.device), keys.shape[2]))


@dataclass(frozen=True)
class SegmentRuns:
    """A layer's runs one after another in `[N, D]` keys and values (`segment_attention`)."""

    keys: torch.Tensor
    values: torch.Tensor
    starts: list[int]
    lengths: list[int]

    def attention(self, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return segment_attention(q, self.keys, self.values, self.starts, self.lengths, scale)


def run_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`segment_attention` over runs given padded: keys, values `[H_kv, T, D]`, head `h` valid in
    `[:lengths[h]]` (the rest is never read), lengths `[H_kv]`."""
    h_kv, t, d = keys.shape
    return segment_attention(q, keys.reshape(h_kv * t, d), values.reshape(h_kv * t, d),
                             [h * t for h in range(h_kv)], lengths.tolist(), scale)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     scale: float, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per request over its own tokens, batched: request `r` attends to `keys[r, :, :lengths[r]]`
    (all of them: its query is its newest token).

    Args:
        q: `[R, H_q, D]`; keys, values: `[R, H_kv, T, D]` (padded with finite numbers; padding masked);
            lengths: `[R]` (>= 1); mask: `length_mask(lengths, T)` when the caller has it.

    Returns:
        out `[R, H_q, D]`, lse `[R, H_q]` (float32).
    """
    r, h_q, d = q.shape
    h_kv, t = keys.shape[1], keys.shape[2]
    if mask is None:
        mask = length_mask(lengths.to(keys.device), t)  # [R, 1, 1, T]
    out, lse = attend(q.view(r, h_kv, h_q // h_kv, d), keys, values, mask, scale)  # [R, H_kv, G, ...]
    return out.reshape(r, h_q, d), lse.reshape(r, h_q)


def causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> tuple[
        torch.Tensor, torch.Tensor]:
    """A request's queries over its own tokens: query `i` of `n` is token `T - n + i` of the `T`.

    Args:
        q: `[n, H_q, D]`; keys, values: `[H_kv, T, D]` (T >= n).

    Returns:
        out `[n, H_q, D]`, lse `[n, H_q]` (float32).
    """
    n, h_kv, t = q.shape[0], keys.shape[0], keys.shape[1]
    g = q.shape[1] // h_kv
    q_pos = (t - n + torch.arange(n, device=keys.device)).repeat(g)  # rows are g-major: [G * n]
    allowed = torch.arange(t, device=keys.device).view(1, -1) <= q_pos.view(-1, 1)  # [G*n, T]
    mask = torch.zeros(allowed.shape, device=keys.device).masked_fill_(~allowed, _NEG_INF)
    out, lse = attend(_group(q, h_kv), keys.unsqueeze(1), values.unsqueeze(1), mask, scale)
    return _ungroup(out, n), _ungroup(lse, n)


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Softmax over the union of two disjoint key sets from each part's normalized output and lse.

    `out_*` `[..., D]`, `lse_*` `[...]`. Part a may be empty (lse -inf: it then contributes nothing);
    part b must not be (a request always attends to its own newest token): the weight of a is
    `exp(lse_a) / (exp(lse_a) + exp(lse_b)) = sigmoid(lse_a - lse_b)`."""
    return torch.lerp(out_b, out_a, torch.sigmoid(lse_a - lse_b).unsqueeze(-1))


def attend_rows(q_all: torch.Tensor, out_all: torch.Tensor, runs: PageRuns | SegmentRuns,
                scale: float, decode_q: torch.Tensor,
                decode_own: OwnTokens | None,
                prefill: list[tuple[int, int, torch.Tensor, torch.Tensor]]) -> None:
    """Overwrite the output rows of one compacted prefix's requests in a step (both engines' glue).

    Args:
        q_all, out_all: the step's `[num_tokens, H_q, D]` queries and attention output (written in place).
        runs: the prefix part of this layer (`PagedStore.read_runs`).
        decode_q: `[R]` token index of each request with one query this step.
        decode_own: their own tokens, None when R is 0.
        prefill: `(q_start, q_end, keys [H_kv, T, D], values)` of each request with several queries.

    One pass of all these queries over the runs, then each request's own tokens, merged by log-sum-exp;
    a step of only a few decode rows over pages takes both parts in one softmax instead
    (`PageRuns.decode_attention`).
    """
    dev = q_all.device
    decode_q = decode_q.to(dev)
    r = decode_q.numel()
    if r and not prefill and isinstance(runs, PageRuns):
        assert decode_own is not None
        out = runs.decode_attention(q_all[decode_q], decode_own, scale)
        if out is not None:
            out_all[decode_q] = out.to(out_all.dtype)
            return
    if r and not prefill and isinstance(runs, SegmentRuns):  # the runs copied once: one softmax over them and
        assert decode_own is not None  # the own tokens (`segment_decode_attention`), no merge
        out_all[decode_q] = segment_decode_attention(
            q_all[decode_q], runs.keys.T, runs.values, runs.starts, runs.lengths, decode_own.keys.transpose(-1, -2),
            decode_own.values, decode_own.mask, scale).to(out_all.dtype)
        return
    if prefill:
        index = torch.cat([decode_q] + [torch.arange(qs, qe, device=dev) for qs, qe, _, _ in prefill])
        q_rows = q_all[index]
    else:
        q_rows = q_all[decode_q]
    out_p, lse_p = runs.attention(q_rows, scale)
    if r:
        assert decode_own is not None
        out_o, lse_o = decode_attention(q_rows[:r], decode_own.keys, decode_own.values, decode_own.lengths, scale,
                                        decode_own.mask)
        out_all[decode_q] = merge(out_p[:r], lse_p[:r], out_o, lse_o).to(out_all.dtype)
    at = r
    for qs, qe, own_k, own_v in prefill:
        out_o, lse_o = causal_attention(q_all[qs:qe], own_k, own_v, scale)
        out_all[qs:qe] = merge(out_p[at:at + qe - qs], lse_p[at:at + qe - qs], out_o, lse_o).to(out_all.dtype)
        at += qe - qs
