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
H_q / H_kv`. Computed in float32.
"""

from __future__ import annotations

import torch


def _group(q: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """`[n, H_q, D]` -> `[H_kv, G * n, D]` (rows g-major within each KV head)."""
    n, h_q, d = q.shape
    g = h_q // n_kv_heads
    return q.view(n, n_kv_heads, g, d).permute(1, 2, 0, 3).reshape(n_kv_heads, g * n, d)


def _ungroup(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `_group` for outputs `[H_kv, G * n, ...]` -> `[n, H_q, ...]`."""
    h_kv = x.shape[0]
    rest = x.shape[2:]
    g = x.shape[1] // n
    return x.reshape(h_kv, g, n, *rest).permute(2, 0, 1, *range(3, 3 + len(rest))).reshape(n, h_kv * g, *rest)


def _masked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[H, m, D]`, keys/values `[H, T, D]`, mask `[H or 1, m or 1, T]` (True = attend).
    Returns out `[H, m, D]` and lse `[H, m]` (-inf and out 0 for a row that attends to nothing)."""
    s = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale  # [H, m, T]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [H, m]
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    p = torch.where(finite.unsqueeze(-1), p, torch.zeros_like(p))
    return torch.matmul(p, values.float()), lse


def run_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries over every KV head's own run.

    Args:
        q: `[n, H_q, D]` queries (all requests of the step on this prefix, stacked).
        keys, values: `[H_kv, T, D]` runs, head `h` valid in `[:lengths[h]]` (the rest is never read).
        lengths: `[H_kv]` int64.
        scale: softmax scale.

    Returns:
        out `[n, H_q, D]` float32, lse `[n, H_q]` float32 (-inf for a head whose run is empty).

    One matmul pair per KV head over exactly its run (no padding: `pair` runs are very uneven, the
    longest can be the whole prefix while most are short).
    """
    n, h_q, d = q.shape
    h_kv = keys.shape[0]
    g = h_q // h_kv
    out = q.new_zeros((n, h_q, d), dtype=torch.float32)
    lse = torch.full((n, h_q), float("-inf"), dtype=torch.float32, device=q.device)
    lens = lengths.tolist()
    for h in range(h_kv):
        t = int(lens[h])
        if t == 0:
            continue
        qh = q[:, h * g:(h + 1) * g].float().reshape(n * g, d)
        s = torch.matmul(qh, keys[h, :t].float().T) * scale  # [n*G, t]
        m = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - m.unsqueeze(-1))
        out[:, h * g:(h + 1) * g] = torch.matmul(p, values[h, :t].float()).view(n, g, d)
        lse[:, h * g:(h + 1) * g] = m.view(n, g)
    return out, lse


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per request over its own tokens, batched: request `r` attends to `keys[r, :, :lengths[r]]`
    (all of them: its query is its newest token).

    Args:
        q: `[R, H_q, D]`; keys, values: `[R, H_kv, T, D]` (padded; padding masked); lengths: `[R]` (>= 1).

    Returns:
        out `[R, H_q, D]`, lse `[R, H_q]` (float32).
    """
    r, h_q, d = q.shape
    h_kv, t = keys.shape[1], keys.shape[2]
    g = h_q // h_kv
    s = torch.matmul(q.float().view(r, h_kv, g, d), keys.float().transpose(-1, -2)) * scale  # [R, H, G, T]
    mask = torch.arange(t, device=keys.device).view(1, 1, 1, t) < lengths.to(keys.device).view(r, 1, 1, 1)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [R, H, G]
    p = torch.exp(s - lse.unsqueeze(-1))
    valid = mask.view(r, 1, t, 1)  # padding may hold anything (other requests' tokens, uninitialised memory)
    out = torch.matmul(p, torch.where(valid, values.float(), 0.0))  # [R, H, G, D]
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
    mask = (torch.arange(t, device=keys.device).view(1, -1) <= q_pos.view(-1, 1)).unsqueeze(0)  # [1, G*n, T]
    out, lse = _masked_attention(_group(q, h_kv), keys, values, mask, scale)
    return _ungroup(out, n), _ungroup(lse, n)


def attend_rows(q_all: torch.Tensor, out_all: torch.Tensor, runs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                scale: float, decode_q: torch.Tensor,
                decode_own: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                prefill: list[tuple[int, int, torch.Tensor, torch.Tensor]]) -> None:
    """Overwrite the output rows of one compacted prefix's requests in a step (both engines' glue).

    Args:
        q_all, out_all: the step's `[num_tokens, H_q, D]` queries and attention output (written in place).
        runs: the prefix's `(keys, values, lengths)` (`run_attention`).
        decode_q: `[R]` token index of each request with one query this step.
        decode_own: their own tokens `(keys [R, H_kv, T, D], values, lengths [R])` (`decode_attention`),
            None when R is 0.
        prefill: `(q_start, q_end, keys [H_kv, T, D], values)` of each request with several queries.

    One pass of all these queries over the runs, then each request's own tokens, merged by log-sum-exp.
    """
    dev = q_all.device
    decode_q = decode_q.to(dev)
    index = torch.cat([decode_q] + [torch.arange(qs, qe, device=dev) for qs, qe, _, _ in prefill])
    out_p, lse_p = run_attention(q_all[index], *runs, scale)
    r = decode_q.numel()
    if r:
        assert decode_own is not None
        out_o, lse_o = decode_attention(q_all[decode_q], *decode_own, scale)
        out_all[decode_q] = merge(out_p[:r], lse_p[:r], out_o, lse_o).to(out_all.dtype)
    at = r
    for qs, qe, own_k, own_v in prefill:
        out_o, lse_o = causal_attention(q_all[qs:qe], own_k, own_v, scale)
        out_all[qs:qe] = merge(out_p[at:at + qe - qs], lse_p[at:at + qe - qs], out_o, lse_o).to(out_all.dtype)
        at += qe - qs


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Softmax over the union of two disjoint key sets from each part's normalized output and lse.
    `out_*` `[..., D]`, `lse_*` `[...]`; a part with lse -inf contributes nothing."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    return (out_a * wa.unsqueeze(-1) + out_b * wb.unsqueeze(-1)) / (wa + wb).unsqueeze(-1)
