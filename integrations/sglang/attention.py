# SPDX-License-Identifier: Apache-2.0
"""Attention of SGLang requests whose compacted prefix lies in head pages (`pair`, `layer_budget`).

SGLang's attention backends read one row of `req_to_token` per request: every KV head the same tokens.
A compacted entry in head pages (`kvzip_plugin.paged_store`) owns whole pages of the token pool whose
(slot, head) pairs hold different runs per (layer, KV head). A request on it is adopted like a `head`
entry (its `req_to_token` row starts with the entry's P slots, its own tokens follow, its RoPE positions
are logical), so SGLang's forward runs as usual and writes the request's new keys and values; its output
rows for these requests are then overwritten in every `RadixAttention` layer (the wrapper of
`capture.ScoreCapture`) with

    softmax over [every KV head's run of the prefix] + [the request's own tokens, causal],

merged by log-sum-exp (`kvzip_plugin.prefix_attention`; an entry's decode rows alone take one softmax over the
runs and their own tokens); one pass over the runs per entry and layer for all of the batch's requests on it.
A batch whose rows on two entries or more, with few rows each, all decode (one query each) on pages of one
token, read by torch, takes instead ONE padded pass per layer for all of them
(`kvzip_plugin.token_decode`: on CPU a decode step is bound by the op count, which no longer grows with the
number of entries); one entry's few decode rows take ONE block-masked call per layer over its runs and their own
tokens (`token_decode.EntryDecode`). SGLang's CPU backend does not compute these rows at all
(`native_backend.py`). Other requests keep SGLang's kernel untouched.

The plan of a batch is set by the `ForwardBatch.init_new` hook (`arm`) and matched in the layers by what
the copy SGLang runs the model on carries over from it (its tensors are replaced by the runner's static
buffers): the forward mode, batch size, `seq_lens_sum` (grows every decode step) and, for extend batches,
the `extend_seq_lens_cpu` list object. A CUDA-graph replay would run the backend alone: the cache
refuses these structures when CUDA graphs are on (`runtime.unsupported_runtime_reason`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from kvzip_plugin.kernel_runs import backend_name, use_kernel
from kvzip_plugin.paged_store import PagedStore, StoreCache
from kvzip_plugin.prefix_attention import OwnTokens, attend_rows, length_mask, own_positions
from kvzip_plugin.step_decode import one_pass
from kvzip_plugin.token_decode import EntryDecode, RunIndexCache, TokenDecode

ONE_PASS_MAX_RUN = 1024
"""Longest run (tokens of one (layer, KV head)) for which a decode batch on several entries takes `token_decode`'s
one pass. Per layer, SmolLM2 shapes, `pair` 0.3, 2 cores (`benchmarks/bench_token_decode.py`, per-entry / one
pass ms): 512-token entries, 4 x 1 request 1.07 / 0.55, 4 x 2 1.27 / 0.86; 2,048 tokens, 4 x 1 1.41 / 1.60,
4 x 2 1.69 / 5.43; 8,192 tokens, 4 x 1 3.25 / 8.99; one entry x 32 requests at 8,192 2.4 / 208."""

ENTRY_DECODE_MAX_COLUMNS = 3072
"""Most keys per query row (an entry's kept pairs per layer on average + its decode rows' own tokens, every KV head:
`EntryDecode` scores each row against all of them, `H_kv` times what it needs) for which one entry's few decode
rows take the masked call. Measured (SmolLM2, `pair` 0.3, 2-core CPU): at 2,048 tokens (~1,840 pairs per layer)
the call halved the plugin's attention of a one-request step in the server (`benchmarks/README.md`); at 8,192
(~7,370) the one-layer micro-benchmark has it 1.1-1.6x the per-entry pass, and 4,096 (~3,690) showed no gain
through the server, so longer entries keep the per-entry pass."""

logger = logging.getLogger("sglang.kvzip_plugin")


@dataclass(frozen=True)
class PagedRow:
    """One request of a batch on a head-page entry.

    Attributes:
        store: the entry's store.
        row: its `req_to_token` row.
        q_start, n_q: where its queries lie in the batch and how many.
        seq_len: physical tokens of its row after this step (the store's slots + its own tokens).
    """

    store: PagedStore
    row: int
    q_start: int
    n_q: int
    seq_len: int


class PagedAttention:
    """Overwrites the output rows of requests on head-page entries, layer by layer."""

    def __init__(self, layers: list[Any], kv_pool: Any, req_to_token: torch.Tensor, page_size: int) -> None:
        self.index = {layer.layer_id: i for i, layer in enumerate(sorted(layers, key=lambda x: x.layer_id))}
        self.layer_ids = sorted(self.index, key=self.index.get)
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.page_size = page_size
        self.armed: tuple[Any, list[list[PagedRow]]] | None = None
        self._own: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        """Per group of the armed batch: its decode rows' own-token slots `[R, T]`, their own counts `[R]`,
        padding mask and query rows (the same in every layer: built at the first layer)."""
        self.backend: str | None = None  # what read the runs last (logged when it changes)
        self._step: TokenDecode | EntryDecode | None | bool = False
        """The armed batch's one pass (`TokenDecode` / `EntryDecode`: every row a decode row on one-token pages,
        torch path), None when the batch takes the per-entry path; False until its first layer decides."""
        self._rows: frozenset[int] = frozenset()  # the armed batch's rows (`rows_of`)
        self._run_index: StoreCache | None = None  # token_decode's run indexes (built at the first one-pass step)

    def views(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-major `[num_pages, page_size, H_kv, D]` views of layer `idx`'s key and value buffers."""
        layer_id = self.layer_ids[idx]
        k = self.kv_pool._get_key_buffer(layer_id)
        v = self.kv_pool._get_value_buffer(layer_id)
        return (k.view(-1, self.page_size, k.shape[-2], k.shape[-1]),
                v.view(-1, self.page_size, v.shape[-2], v.shape[-1]))

    def flat(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `idx`'s key and value buffers as flat `[slots * H_kv, D]` views (`token_decode.FlatViews`)."""
        layer_id = self.layer_ids[idx]
        k = self.kv_pool._get_key_buffer(layer_id)
        v = self.kv_pool._get_value_buffer(layer_id)
        return k.view(-1, k.shape[-1]), v.view(-1, v.shape[-1])

    def arm(self, forward_batch: Any, rows: list[PagedRow]) -> None:
        """The rows of `forward_batch`'s forward (grouped by store)."""
        self._own = {}
        self._step = False
        if not rows:
            self.armed = None
            return
        groups: dict[int, list[PagedRow]] = {}
        for r in rows:
            groups.setdefault(id(r.store), []).append(r)
        self.armed = (_marker(forward_batch), list(groups.values()))
        self._rows = frozenset(r.row for r in rows)

    def rows_of(self, layer: Any, forward_batch: Any) -> frozenset[int]:
        """The `req_to_token` rows whose output `apply` writes in this layer of `forward_batch` (empty when the
        batch is not the armed one): SGLang's CPU backend skips them (`native_backend.py`)."""
        armed = self.armed
        if armed is None or layer.layer_id not in self.index or _marker(forward_batch) != armed[0]:
            return frozenset()
        return self._rows

    def apply(self, layer: Any, query: torch.Tensor, output: torch.Tensor, forward_batch: Any) -> None:
        """Overwrite the output rows of the armed batch's requests on head-page entries in this layer."""
        armed = self.armed
        if armed is None or _marker(forward_batch) != armed[0]:
            return
        idx = self.index.get(layer.layer_id)
        if idx is None:
            return
        n_heads, head_dim = int(layer.tp_q_head_num), int(layer.qk_head_dim)
        q_all = query.reshape(query.shape[0], n_heads, head_dim)
        out_all = output.view(output.shape[0], n_heads, -1)
        k_buf = self.kv_pool._get_key_buffer(layer.layer_id)  # [slots, H_kv, D]
        v_buf = self.kv_pool._get_value_buffer(layer.layer_id)
        scale = float(layer.scaling)
        step = self._token_step(armed[1], k_buf, v_buf, n_heads)
        if step is not None:  # every row decodes on one-token pages: all of them in one pass
            step.attend(idx, q_all, out_all, self.flat, idx, scale)
            self._log_backend("torch (one pass for the step's decode rows)" if isinstance(step, TokenDecode)
                              else "torch (one masked call for one entry's few decode rows)")
            return
        for gi, group in enumerate(armed[1]):
            store = group[0].store
            first = store.n_slots  # the entry's slots head every row; the request's own tokens follow
            own_slots, own_len, mask, decode_q = self._own_plan(gi, group, first)
            own = None
            if own_len.numel():  # one query each: the requests' own tokens in one batched gather
                own = OwnTokens(_tokens(k_buf, own_slots).transpose(1, 2),  # [R, H_kv, T, D]
                                _tokens(v_buf, own_slots).transpose(1, 2), own_len, mask)
            prefill = []
            for r in group:
                if r.n_q > 1:
                    slots = self.req_to_token[r.row, first:r.seq_len].long()
                    prefill.append((r.q_start, r.q_start + r.n_q, _tokens(k_buf, slots).transpose(0, 1),
                                    _tokens(v_buf, slots).transpose(0, 1)))  # [H_kv, T, D]
            runs = store.read_runs(idx, self.views)
            self._log_backend(backend_name(runs))
            attend_rows(q_all, out_all, runs, scale, decode_q, own, prefill)

    def _log_backend(self, name: str) -> None:
        if name != self.backend:
            self.backend = name
            logger.info("kvzip-plugin: requests on head-page entries attend to the runs through %s", name)

    def _token_step(self, groups: list[list[PagedRow]], k_buf: torch.Tensor, v_buf: torch.Tensor, n_heads: int
                    ) -> TokenDecode | EntryDecode | None:
        """The armed batch's one-pass plan (`token_decode`), decided and built at its first layer, when every row
        decodes (one query), each entry has few rows (`step_decode.one_pass`), pages hold one token, the buffers
        can be viewed flat and the runs are read by torch (the Triton kernel reads them in place on CUDA):
        one entry takes `EntryDecode` (its runs read once, one masked call) while each row has at most
        `ENTRY_DECODE_MAX_COLUMNS` keys to score; two or more take `TokenDecode` while
        their runs are at most `ONE_PASS_MAX_RUN` tokens (it copies every row's runs padded to the longest). Many
        rows on an entry, or several entries with long runs, take the per-entry pass
        (`benchmarks/bench_token_decode.py`)."""
        if self._step is not False:
            return self._step
        rows = [r for group in groups for r in group]
        self._step = None
        h_kv = int(k_buf.shape[-2])
        group = n_heads // h_kv
        if not (self.page_size == 1 and all(one_pass(len(grp), group) for grp in groups)
                and all(r.n_q == 1 for r in rows) and k_buf.is_contiguous()
                and v_buf.is_contiguous() and not use_kernel(k_buf.device)):
            return None
        if len(groups) == 1:  # one entry's few decode rows: its runs read once, one masked call per layer
            store = rows[0].store
            own_max = max(r.seq_len - store.n_slots for r in rows)
            columns = int(store.layout.lengths.sum()) / store.layout.lengths.shape[0] + len(rows) * h_kv * own_max
            if columns > ENTRY_DECODE_MAX_COLUMNS:
                return None
            slots, own_len = self._own_slots(rows)
            self._step = EntryDecode.plan(store, torch.tensor([r.q_start for r in rows]), slots, own_len, h_kv,
                                          n_heads)
        elif max(int(grp[0].store.layout.lengths.max()) for grp in groups) <= ONE_PASS_MAX_RUN:
            slots, own_len = self._own_slots(rows)
            if self._run_index is None:
                self._run_index = RunIndexCache(h_kv)
            self._step = TokenDecode.plan([r.store for r in rows], torch.tensor([r.q_start for r in rows]), slots,
                                          own_len, h_kv, self._run_index)
        return self._step

    def _own_plan(self, gi: int, group: list[PagedRow], first: int):
        """Group `gi`'s decode rows: own-token slots, counts, padding mask and query rows (built once per batch)."""
        plan = self._own.get(gi)
        if plan is None:
            decode = [r for r in group if r.n_q == 1]
            dev = self.req_to_token.device
            own_len = torch.tensor([r.seq_len - first for r in decode], dtype=torch.long)
            slots = torch.zeros(0, 0, dtype=torch.long, device=dev)
            mask = torch.zeros(0, 1, 1, 0, device=dev)
            if decode:
                slots, own_len = self._own_slots(decode)
                mask = length_mask(own_len.to(dev), slots.shape[1])
            plan = (slots, own_len, mask, torch.tensor([r.q_start for r in decode], dtype=torch.long))
            self._own[gi] = plan
        return plan

    def _own_slots(self, rows: list[PagedRow]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode rows' own tokens (after their entry's slots, the newest included): slots `[R, T]` padded with
        a repeat of each row's last (`own_positions`), and counts `[R]`."""
        dev = self.req_to_token.device
        own_len = torch.tensor([r.seq_len - r.store.n_slots for r in rows], dtype=torch.long)
        first = torch.tensor([r.store.n_slots for r in rows], device=dev).view(-1, 1)
        pos = own_positions(own_len).to(dev)
        index = torch.tensor([r.row for r in rows], device=dev).view(-1, 1)
        return self.req_to_token[index, first + pos].long(), own_len

def _tokens(buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`buf[slots]` for a `[slots, H_kv, D]` buffer and any shape of `slots`, as one `index_select` (on CPU 2-4x
    faster than advanced indexing)."""
    return buf.index_select(0, slots.reshape(-1)).view(*slots.shape, *buf.shape[1:])


def _marker(forward_batch: Any) -> tuple:
    lens = getattr(forward_batch, "extend_seq_lens_cpu", None)
    return (forward_batch.forward_mode, getattr(forward_batch, "batch_size", None),
            getattr(forward_batch, "seq_lens_sum", None), id(lens) if lens is not None else None)
