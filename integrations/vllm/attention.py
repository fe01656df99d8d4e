# SPDX-License-Identifier: Apache-2.0
"""Attention of vLLM requests whose compacted prefix lies in head pages (`pair`, `layer_budget`).

vLLM's kernels read one token count per request over whole blocks, so they cannot read runs of
different lengths per KV head. For those requests the worker's `impl.forward` wrapper runs after
vLLM's own forward (which has written this step's keys and values into the request's own blocks
and computed something for these rows that is discarded: the runner adapter lowered their
`seq_lens` to their own tokens, so that pass is short) and overwrites their output rows with

    softmax over [every KV head's run of the prefix] + [the request's own tokens, causal],

On vLLM's CPU backend (default) every such row of every store is computed by vLLM's own CPU kernel
reading the head pages in place, one call per layer (`cpu_kernel.py`). Otherwise the softmax is
computed from every page's partial softmax. On the torch path (`KVZIP_PREFIX_ATTENTION=torch`, or a pool
the CPU kernel cannot address), when two stores or more have a
few decode rows in a step, those rows take one pass per layer together (`kvzip_plugin.step_decode`: a
store's pages are read once per step, the op count does not grow with the stores); rows with several
queries (prefill), stores with many decode rows, a lone store, and every row where the Triton kernel reads
the runs, take one pass per store and layer (`prefix_attention.attend_rows`: runs and own tokens merged
by log-sum-exp). Other requests keep vLLM's kernel untouched. Positions are never needed: keys carry
their RoPE rotation.

Block table row of such a request: `[store blocks (n_blocks)] + [its own blocks]`; its own tokens
start at slot `n_blocks * block_size` (the slot offset `L - n_blocks * block_size` of `runner.py`).

The store (`kvzip_plugin.paged_store`) lies in blocks of vLLM's own pool: a head page is one KV head's
slice of one block of one layer's buffer (`layout.token_major(...)[block, :, head]`; contiguous for keys
and for values on the CPU backend). The scheduler reserves blocks (`store.max_store_blocks`), the worker
writes the runs into the leading `layout.n_blocks` of them and reports that count, the rest is freed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from kvzip_plugin.integrations.vllm import layout
from kvzip_plugin.integrations.vllm.cpu_cascade import CASCADE_NAME, CascadeGroup, takes_cascade
from kvzip_plugin.integrations.vllm.cpu_kernel import KERNEL_NAME, FlatPages, KernelStep

from kvzip_plugin import envs
from kvzip_plugin.kernel_runs import backend_name, use_kernel
from kvzip_plugin.paged_store import PagedStore, PageReader, Views
from kvzip_plugin.prefix_attention import OwnTokens, attend_rows, length_mask, own_positions
from kvzip_plugin.step_decode import DecodeStep, PrefixPageCache, one_pass

logger = logging.getLogger("vllm.kvzip_plugin.attention")
_backends: set[str] = set()  # what has read the runs in this process (each logged the first time)


def _log_backend(name: str) -> None:
    if name not in _backends:  # once each: a step may take two paths, and steps alternate between them
        _backends.add(name)
        logger.info("kvzip-plugin: requests on head-page stores attend to the runs through %s", name)


@dataclass(frozen=True)
class _Group:
    """The step's requests on one store: their rows, query spans, and the batched decode rows."""

    store: PagedStore
    rows: list[int]
    spans: list[tuple[int, int]]
    decode: list[int]  # positions in `rows` of rows with one query
    decode_q: torch.Tensor  # [R] their query's token index
    decode_lens: torch.Tensor  # [R] their own tokens
    decode_blocks: torch.Tensor  # [R, T] block of each of their own tokens (padding repeats the last)
    decode_offsets: torch.Tensor  # [R, T] offset in that block
    decode_mask: torch.Tensor  # [R, 1, 1, T] additive mask of the padding (`length_mask`), for every layer


@dataclass(frozen=True)
class StepPlan:
    """How a step's rows on head-page stores attend: `kernel` (CPU, vLLM's own kernel) takes them all in
    one call per layer; otherwise `decode` (torch path) takes the decode rows of every store with few of
    them (`step_decode.one_pass`) in one pass per layer when two stores or more have such rows, and
    `groups` the rest, store by store (all rows where the Triton kernel reads)."""

    groups: list[_Group]
    decode: DecodeStep | None
    kernel: KernelStep | None = None
    cascade: tuple[CascadeGroup, ...] = ()


def plan_step(rows: Mapping[str, tuple[int, PagedStore]], meta, cache: PrefixPageCache, num_heads: int,
              flat: FlatPages | None = None) -> StepPlan:
    """Group this step's rows by store (once per step: the same for every layer); `num_heads`: H_q; `flat`:
    the pool as vLLM's CPU kernel can read head pages (None: not available)."""
    qsl = meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens.tolist()
    dev = meta.block_table.device
    by_store: dict[int, list[tuple[int, PagedStore]]] = {}
    for row, store in rows.values():
        by_store.setdefault(id(store), []).append((row, store))
    if by_store and flat is not None and dev.type == "cpu" and envs.prefix_attention_backend() == "auto":
        kernel_plan = _plan_cpu(by_store, qsl, seq_lens, meta.block_table, flat, num_heads, dev)
        if kernel_plan is not None:
            return kernel_plan
    per_store = []  # (store, its rows, their query spans, positions in them of the rows with one query)
    for members in by_store.values():
        rws = [row for row, _ in members]
        spans = [(int(qsl[row]), int(qsl[row + 1])) for row in rws]
        per_store.append((members[0][1], rws, spans, [i for i, (qs, qe) in enumerate(spans) if qe - qs == 1]))
    # the one pass pays off for the decode rows of two stores or more (for one, the per-store path is faster)
    batched: set[int] = set()
    if not use_kernel(dev):
        batched = {k for k, (store, _, _, decode) in enumerate(per_store)
                   if decode and one_pass(len(decode), num_heads // store.layout.n_heads)}
        batched = batched if len(batched) > 1 else set()
    groups, stores, rows_of, decode_q, own_lens, own_tables = [], [], [], [], [], []
    for k, (store, rws, spans, decode) in enumerate(per_store):
        first, bs = store.layout.n_blocks, store.layout.page_size
        if k in batched:
            stores.append(store)
            rows_of.append(list(range(len(decode_q), len(decode_q) + len(decode))))
            decode_q += [spans[i][0] for i in decode]
            own_lens += [int(seq_lens[rws[i]]) for i in decode]
            own_tables.append(meta.block_table[torch.tensor([rws[i] for i in decode], device=dev)][:, first:])
            if len(rws) == len(decode):
                continue  # no prefill row on this store
            decode = []
        lens = torch.tensor([int(seq_lens[rws[i]]) for i in decode], dtype=torch.long)
        blocks = offsets = torch.zeros(0, 0, dtype=torch.long, device=dev)
        mask = torch.zeros(0, 1, 1, 0, device=dev)
        if decode:
            pos = own_positions(lens).to(dev)  # [R, T]
            table = meta.block_table[torch.tensor([rws[i] for i in decode], dtype=torch.long, device=dev)][
                :, first:].long()
            blocks, offsets = table.gather(1, pos // bs), pos % bs
            mask = length_mask(lens.to(dev), pos.shape[1])
        groups.append(_Group(store, rws, spans, decode,
                             torch.tensor([spans[i][0] for i in decode], dtype=torch.long), lens, blocks, offsets,
                             mask))
    step = None
    if stores:
        width = max(t.shape[1] for t in own_tables)
        table = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in own_tables])
        step = DecodeStep.plan(stores, rows_of, torch.tensor(decode_q, dtype=torch.long),
                               torch.tensor(own_lens, dtype=torch.long), table, stores[0].layout.n_heads,
                               stores[0].layout.page_size, cache)
    return StepPlan(groups, step)


def _plan_cpu(by_store: Mapping[int, list[tuple[int, PagedStore]]], qsl: list[int], seq_lens: list[int],
              block_table: torch.Tensor, flat: FlatPages, num_heads: int, dev: torch.device) -> StepPlan | None:
    """vLLM's CPU path: the decode rows of a store with many of them take the cascade (`cpu_cascade.py`), every
    other row vLLM's kernel (`cpu_kernel.py`); None where a store's runs cannot be read this way."""
    groups, cascade = [], []
    for members in by_store.values():
        store = members[0][1]
        rows = [(int(qsl[row]), int(qsl[row + 1]), int(seq_lens[row]), row) for row, _ in members]
        decode = [(qs, own, row) for qs, qe, own, row in rows if qe - qs == 1]
        mean_run = store.cached(("mean_run",), lambda s=store: float(s.layout.lengths.float().mean()))
        if takes_cascade(len(decode), num_heads // flat.n_kv_heads, mean_run):
            got = CascadeGroup.plan(store, decode, block_table, flat, dev)
            if got is None:
                return None
            cascade.append(got)
            rows = [x for x in rows if x[1] - x[0] > 1]
        if rows:
            groups.append((store, rows))  # per store: its rows' query span, own tokens, table row
    kernel = None
    if groups:
        kernel = KernelStep.plan(groups, block_table, flat, dev)
        if kernel is None:
            return None
    return StepPlan([], None, kernel, tuple(cascade))


def attend_paged(layer: int, query: torch.Tensor, output: torch.Tensor, plan: StepPlan, views: Views,
                 pages: PageReader, own_views_of: Callable[[], tuple[torch.Tensor, torch.Tensor]], meta,
                 num_heads: int, head_size: int, scale: float, flat: FlatPages | None = None) -> None:
    """Overwrite the output rows of requests on head-page stores, for one layer.

    Args:
        layer: index of the layer (row of each store's layout).
        query: `[num_tokens, H_q, D]` (or flat) post-RoPE queries of the step.
        output: the attention output vLLM's forward filled, `[num_tokens, H_q * D]` (or 3-D); written in place.
        plan: `plan_step` of this step.
        views: token-major views of every layer's buffer (the store's pages may lie in any of them).
        pages: the fastest read of head pages of any layer's buffer (`layout.page_reader`).
        own_views_of: this layer's (keys, values) token-major views (the requests' own tokens), built on demand
            (only the per-store path reads them).
        meta: vLLM's attention metadata (`seq_lens` = own tokens, `block_table`).
        flat: the pool for vLLM's CPU kernel (`plan.kernel`).
    """
    q_all = query.view(query.shape[0], num_heads, head_size)
    out_all = output.view(output.shape[0], num_heads, head_size)
    if plan.kernel is not None or plan.cascade:
        assert flat is not None
        if plan.kernel is not None:
            _log_backend(KERNEL_NAME)
            plan.kernel.attend(layer, q_all, out_all, flat, scale)
        for group in plan.cascade:
            _log_backend(CASCADE_NAME)
            group.attend(layer, q_all, out_all, flat, scale)
        return
    if plan.decode is not None:
        _log_backend("torch, every store's decode rows in one pass")
        plan.decode.attend(layer, q_all, out_all, pages, scale)
    own_views = own_views_of() if plan.groups else None
    for grp in plan.groups:
        own = None
        if grp.decode:  # one query each: the requests' own tokens in one batched gather
            own = OwnTokens(own_views[0][grp.decode_blocks, grp.decode_offsets].transpose(1, 2),  # [R, H_kv, T, D]
                            own_views[1][grp.decode_blocks, grp.decode_offsets].transpose(1, 2), grp.decode_lens,
                            grp.decode_mask)
        first = grp.store.layout.n_blocks  # the store's blocks head every row; own tokens follow
        prefill = []
        for row, (qs, qe) in zip(grp.rows, grp.spans, strict=True):
            if qe - qs > 1:
                table, n_own = meta.block_table[row][first:], int(meta.seq_lens[row])
                prefill.append((qs, qe, layout.read_tokens(own_views[0], table, n_own),  # [H_kv, n_own, D]
                                layout.read_tokens(own_views[1], table, n_own)))
        runs = grp.store.read_runs(layer, views, pages)
        _log_backend(backend_name(runs))
        attend_rows(q_all, out_all, runs, scale, grp.decode_q, own, prefill)

