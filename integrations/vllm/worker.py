# SPDX-License-Identifier: Apache-2.0
"""Worker half of KVzip in vLLM: score capture, compaction copy, per-request slot offsets.

* Scoring: each attention layer's `impl.forward` is wrapped (per instance). After the real
  forward has written this step's keys into the paged cache, the wrapper takes the post-RoPE
  queries of the scoring requests in the batch (only those rows), reads their keys back from the
  cache and runs the engine-agnostic kernel `kvzip_plugin.scoring.kvzip.chunk_scores`, keeping the
  max per (layer, KV head, context token) over steps and chunks. Other requests cost one dict
  lookup per layer.
* Compaction: on a `CompactCommand` the runs each (layer, KV head) keeps are chosen for the
  command's structure (`store.select_runs`). If every run has the same length P (always for `head`;
  `pair` at ratio 1.0) they are laid out by `plan_compaction` (slot j of every head = its j-th kept
  token) and served by vLLM's own kernel; otherwise they go to head pages (`store.py`) and are served
  by the plugin's attention (`attention.py`). Source blocks are only read.
* Tensor parallelism: each rank holds its own KV heads, scores them and selects their pairs (`pair`'s
  threshold is per rank, so every rank keeps the same fraction and no rank's blocks sit half empty: the
  scheduler reserves the same block ids on every rank, so the fullest rank would set the block count).
  The layout must be the same on every rank (the scheduler publishes one `L - P` and one path for the
  store), so under TP > 1 a `pair` / `layer_budget` store always goes to head pages, even on a rank whose
  runs happen to be equal; `kvzip_head` takes the rank's rows of the head-score file.
* Offsets: `offsets[req_id] = L - P` for scheduled requests on a compacted prefix; the runner
  adapter (`runner.py`) turns them into physical slots and `seq_lens`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kvzip_plugin.integrations.vllm import layout
from kvzip_plugin.integrations.vllm.attention import StepPlan, attend_paged, plan_step
from kvzip_plugin.integrations.vllm.cpu_kernel import FlatPages
from kvzip_plugin.integrations.vllm.protocol import (
    CompactCommand,
    CompactionResult,
    KVzipConnectorMetadata,
    ScoringTarget,
)

from kvzip_plugin import envs
from kvzip_plugin.compaction import apply_compaction, plan_compaction
from kvzip_plugin.head_scores import head_level_scores
from kvzip_plugin.metrics import KVzipStats, ScoringClock
from kvzip_plugin.paged_store import PagedStore, StoreIndex, write_store
from kvzip_plugin.scoring.kvzip import chunk_scores
from kvzip_plugin.step_decode import PrefixPageCache
from kvzip_plugin.store import block_table_tokens, place_runs, select_runs

logger = logging.getLogger("vllm.kvzip_plugin.worker")

_WRAPPED = "__kvzip_forward__"


@dataclass
class _JobScores:
    scores: torch.Tensor  # [layers, H_kv, n_context] float32, max so far
    prefix_len: int
    kernel_seconds: float = 0.0  # score capture so far
    clock: ScoringClock = field(default_factory=ScoringClock)


class WorkerState:
    """Per-worker KVzip state. One instance per worker process (the connector's)."""

    def __init__(self, query_block: int = 512, tp_size: int = 1) -> None:
        self.query_block = query_block
        self.tp_size = tp_size
        self.tp_rank = 0  # set in `register` (the distributed state exists by then)
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.layer_index: dict[str, int] = {}
        self.layer_names: list[str] = []
        self.specs: dict[str, layout.LayoutSpec] = {}
        self.scales: dict[str, float] = {}
        self.num_heads: dict[str, int] = {}
        self.unsupported: str | None = None
        self.scoring: dict[str, ScoringTarget] = {}
        self.offsets: dict[str, int] = {}
        self.store_of: dict[str, int] = {}  # scheduled request -> job id of the compacted prefix it reads
        self.store_index = StoreIndex()  # head-page stores held by this worker
        self.paged_rows: dict[str, tuple[int, PagedStore]] = {}  # this step: request -> (row, store)
        self._paged_plan: tuple[Any, StepPlan] | None = None  # (attention metadata, its plan_step)
        self.prefix_pages = PrefixPageCache()  # the stores' pages by layer, listed for the steps' decode rows
        self.forwards_skipped = 0  # layer forwards of vLLM not run: every row was on a head-page store (`_wrap`)
        self.flat: FlatPages | None = None  # the pool as vLLM's CPU kernel reads head pages (CPU backend)
        self.plain_attention: dict[str, str | None] = {}  # layer -> what head-page attention cannot do
        self.batch_rows: dict[str, int] = {}  # scoring req -> row in this step's batch (runner.py)
        self.step_tokens: dict[str, int] = {}
        self.step_started: float | None = None
        self._kernel_at_start: dict[int, float] = {}  # each job's capture seconds when this step began
        self.jobs: dict[int, _JobScores] = {}
        self.results: list[CompactionResult] = []
        self.stats = KVzipStats()  # decode step times, sent with the connector's stats
        self._decode_step: tuple[int, int] | None = None  # (requests on compacted prefixes, others)

    # ------------------------------------------------------------ setup

    def register(self, kv_caches: Mapping[str, torch.Tensor], layers: Mapping[str, Any],
                 manager_block_size: int | None = None) -> None:
        """Record the layers' buffers and wrap their attention; `layers` maps names to vLLM
        `Attention` modules, `manager_block_size` is the scheduler's block size (the ids the worker is
        sent). Any layer we cannot address disables KVzip in this worker."""
        self.kv_caches = dict(kv_caches)
        self.tp_rank = _tp_rank() if self.tp_size > 1 else 0
        self._readers: dict[int, Any] = {}
        self.prefix_pages = PrefixPageCache(size=64 * max(len(kv_caches), 1))  # ~64 sets of stores
        self.layer_index = {name: i for i, name in enumerate(self.kv_caches)}
        self.layer_names = list(self.kv_caches)
        for name, kv in self.kv_caches.items():
            layer = layers.get(name)
            if layer is None:
                self.unsupported = f"layer {name} is not a vLLM Attention layer"
                break
            try:
                self.specs[name] = layout.detect(
                    kv, backend=layer.attn_backend.get_name(), isa=getattr(layer, "isa", None),
                    block_size=kv.shape[2],  # [blocks, H, bs, 2D] (CPU, 0.33 CUDA) and [2, blocks, bs, H, D]
                    num_kv_heads=layer.num_kv_heads, head_size=layer.head_size)
                if manager_block_size is not None:
                    layout.check_block_size(self.specs[name], manager_block_size)
                if envs.fault_injection() == "kv_layout":
                    raise layout.UnsupportedKVLayout("fault injected (KVZIP_FAULT_INJECTION=kv_layout)")
            except layout.UnsupportedKVLayout as exc:
                self.unsupported = str(exc)
                break
            self.scales[name] = float(layer.impl.scale)
            self.num_heads[name] = int(layer.impl.num_heads)
            self.plain_attention[name] = _unplain(layer.impl)
            self._wrap(name, layer.impl,
                       separate_kv_update=not getattr(layer.attn_backend, "forward_includes_kv_cache_update", True))
        if self.unsupported:
            logger.warning("kvzip-plugin: KV layout not supported (%s); this worker will not score or compact",
                           self.unsupported)
        self.flat = None
        specs = [self.specs[n] for n in self.layer_names] if not self.unsupported else []
        if specs and all(s.kind == "cpu_vec" for s in specs):
            self.flat = FlatPages.of([self.kv_caches[n] for n in self.layer_names], specs[0].num_kv_heads,
                                     specs[0].block_size, specs[0].head_size)
            if self.flat is None:
                logger.info("kvzip-plugin: the layers' KV buffers are not one allocation at a constant stride; "
                            "head-page stores attend through torch")

    def _wrap(self, name: str, impl: Any, separate_kv_update: bool = False) -> None:
        """Wrap `impl.forward`: scoring rows are captured and rows on head-page stores overwritten after vLLM's
        forward. When every row of the step is on a head-page store and the backend writes the step's keys and
        values outside its forward (`separate_kv_update`: vLLM's `forward_includes_kv_cache_update` False, as on
        the CPU backend and FlashAttention), vLLM's forward is skipped: its output would be overwritten whole
        (on the 2-core CPU it cost ~3.5 ms of a 32-request step at 7,680 tokens)."""
        if getattr(impl.forward, _WRAPPED, False):
            return
        original = impl.forward
        state = self

        def forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
            output = kwargs.get("output", args[0] if args else None)
            skip = (separate_kv_update and attn_metadata is not None and output is not None and not state.batch_rows
                    and bool(state.paged_rows) and state.covers_step(attn_metadata))
            if skip:
                state.forwards_skipped += 1
            out = output if skip else original(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
            if attn_metadata is not None:
                if state.batch_rows:
                    state.capture(name, query, kv_cache, attn_metadata)
                if state.paged_rows:
                    state.attend(name, query, out, kv_cache, attn_metadata)
            return out

        setattr(forward, _WRAPPED, True)
        impl.forward = forward

    # ------------------------------------------------------------ per step

    def bind(self, meta: KVzipConnectorMetadata) -> None:
        """Apply one step's metadata (idempotent: the runner adapter and the connector both call it)."""
        if not isinstance(meta, KVzipConnectorMetadata):
            return
        self.scoring.update(meta.scoring)
        self.offsets = dict(meta.offsets)
        self.store_of = dict(meta.stores)
        self.store_index.drop(meta.drop_stores)
        for job_id in meta.drop_jobs:
            self.jobs.pop(job_id, None)
            for rid in [r for r, t in self.scoring.items() if t.job_id == job_id]:
                del self.scoring[rid]

    def covers_step(self, meta: Any) -> bool:
        """Whether every request row of this step's attention metadata is on a head-page store."""
        return len(self.paged_rows) == int(meta.seq_lens.numel())

    def paged_store(self, rid: str) -> PagedStore | None:
        """The head-page store request `rid` reads this step, if its prefix lies in head pages here."""
        return self.store_index.get(self.store_of.get(rid))

    def begin_step(self, req_rows: Mapping[str, int], tokens: Mapping[str, int],
                   paged_rows: Mapping[str, tuple[int, PagedStore]] | None = None) -> None:
        """Called by the runner adapter with this step's rows of scoring requests, the tokens
        scheduled per request and the rows of requests on head-page stores."""
        self.batch_rows = dict(req_rows)
        self.paged_rows = dict(paged_rows or {})
        self._paged_plan = None
        self.step_tokens = dict(tokens)
        self.step_started = time.perf_counter()
        self._kernel_at_start = {job_id: job.kernel_seconds for job_id, job in self.jobs.items()}
        pure_decode = bool(tokens) and not req_rows and all(n == 1 for n in tokens.values())
        compressed = sum(1 for rid in tokens if rid in self.store_of or self.offsets.get(rid))
        self._decode_step = (compressed, len(tokens) - compressed) if pure_decode else None

    def end_step(self) -> None:
        """After the forward: record a pure-decode step's time once per request in it (split by
        compacted vs full prefix: the online decode speedup) and attribute a scoring step's time
        to its jobs (by token share)."""
        if self.step_started is not None and self._decode_step is not None:
            elapsed = time.perf_counter() - self.step_started
            compressed, full = self._decode_step
            self.stats.decode_step_seconds_compressed.extend([elapsed] * compressed)
            self.stats.decode_step_seconds_full.extend([elapsed] * full)
        self._decode_step = None
        if self.step_started is not None and self.batch_rows:
            elapsed = time.perf_counter() - self.step_started
            total = max(1, sum(self.step_tokens.values()))
            by_job: dict[int, int] = {}
            for rid in self.batch_rows:
                job_id = self.scoring[rid].job_id
                by_job[job_id] = by_job.get(job_id, 0) + self.step_tokens.get(rid, 0)
            for job_id, n in by_job.items():
                job = self.jobs.get(job_id)
                if job is not None:
                    capture = job.kernel_seconds - self._kernel_at_start.get(job_id, 0.0)
                    job.clock.add_step(elapsed, capture, n, total)
        self.batch_rows = {}
        self.paged_rows = {}
        self.step_started = None

    def take_stats(self) -> KVzipStats:
        out, self.stats = self.stats, KVzipStats()
        return out

    def capture(self, name: str, query: torch.Tensor, kv_cache: torch.Tensor, meta: Any) -> None:
        """Score this layer for every scoring request in the batch."""
        spec = self.specs.get(name)
        if spec is None:
            return
        t0 = time.perf_counter()
        keys_view, _ = layout.token_major(kv_cache, spec)
        d = spec.head_size
        q_all = query.view(query.shape[0], self.num_heads[name], d)
        for rid, row in self.batch_rows.items():
            tgt = self.scoring[rid]
            qs, qe = int(meta.query_start_loc[row]), int(meta.query_start_loc[row + 1])
            seq_len = int(meta.seq_lens[row])
            first = seq_len - (qe - qs)  # position of this step's first query
            skip = max(0, tgt.prefix_len - first)
            if qe - qs - skip <= 0:
                continue
            q = q_all[qs + skip:qe].transpose(0, 1)  # [H_q, n, D]
            keys = layout.read_tokens(keys_view, meta.block_table[row], seq_len)  # [H_kv, seq_len, D]
            n_p, L = tgt.n_protected, tgt.prefix_len
            other = None
            if tgt.softmax == "full_cache":
                other = torch.cat([keys[:, n_p:n_p + tgt.start], keys[:, n_p + tgt.end:L]], dim=1)
            s = chunk_scores(q, keys[:, :n_p], keys[:, n_p + tgt.start:n_p + tgt.end], keys[:, L:seq_len],
                             self.scales[name], self.query_block, other, query_offset=first + skip - L)
            job = self._job(tgt, keys.shape[0])
            idx = self.layer_index[name]
            span = job.scores[idx, :, tgt.start:tgt.end]
            torch.maximum(span, s.to(span.device), out=span)
            job.kernel_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()

    def views(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-major (keys, values) views of layer `idx`'s buffer."""
        name = self.layer_names[idx]
        return layout.token_major(self.kv_caches[name], self.specs[name])

    def pages(self, idx: int, blocks: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[P, block_size, D]` of head pages of layer `idx`'s buffer (`paged_store.PageReader`)."""
        reader = self._readers.get(idx)
        if reader is None:
            name = self.layer_names[idx]
            reader = self._readers[idx] = layout.page_reader(self.kv_caches[name], self.specs[name])
        return reader(blocks, slots)

    def attend(self, name: str, query: torch.Tensor, output: torch.Tensor, kv_cache: torch.Tensor, meta: Any) -> None:
        """Overwrite this layer's output rows of the requests on head-page stores (`attention.py`)."""
        spec = self.specs.get(name)
        if spec is None:
            return
        if self._paged_plan is None or self._paged_plan[0] is not meta:  # once per step (same metadata)
            self._paged_plan = (meta, plan_step(self.paged_rows, meta, self.prefix_pages,
                                                self.num_heads[name], self.flat))
        attend_paged(self.layer_index[name], query, output, self._paged_plan[1], self.views, self.pages,
                     lambda: layout.token_major(kv_cache, spec), meta, self.num_heads[name], spec.head_size,
                     self.scales[name], self.flat)

    def _job(self, tgt: ScoringTarget, n_kv_heads: int) -> _JobScores:
        job = self.jobs.get(tgt.job_id)
        if job is None:
            n_context = tgt.prefix_len - tgt.n_protected
            device = next(iter(self.kv_caches.values())).device  # accumulated where they are computed (no sync)
            job = _JobScores(torch.zeros(len(self.kv_caches), n_kv_heads, n_context, device=device), tgt.prefix_len)
            self.jobs[tgt.job_id] = job
        return job

    # ------------------------------------------------------------ compaction

    def compact(self, cmd: CompactCommand) -> CompactionResult:
        """Copy the kept pairs of `cmd.job_id` into its destination blocks. Never raises."""
        t0 = time.perf_counter()
        job = self.jobs.pop(cmd.job_id, None)
        for rid in [r for r, t in self.scoring.items() if t.job_id == cmd.job_id]:
            del self.scoring[rid]
        try:
            if self.unsupported:
                raise RuntimeError(f"unsupported KV layout: {self.unsupported}")
            if cmd.head_scores is not None:  # kvzip_head: no scoring pass
                spec = next(iter(self.specs.values()))
                n_context = len(cmd.src_block_ids) * spec.block_size - cmd.n_protected
                rows = rank_head_rows(torch.tensor(cmd.head_scores), spec.num_kv_heads, self.tp_rank, self.tp_size)
                scores = head_level_scores(rows, n_context)
                if scores.shape[:2] != (len(self.kv_caches), spec.num_kv_heads):
                    raise RuntimeError(f"head scores for {tuple(scores.shape[:2])} (layers, this rank's KV heads), "
                                       f"this worker holds {len(self.kv_caches)} layers of {spec.num_kv_heads}")
                job = _JobScores(scores, n_context + cmd.n_protected)
            if job is None:
                raise RuntimeError("no scores were captured for this job")
            if envs.fault_injection() == "compaction":
                raise RuntimeError("fault injected (KVZIP_FAULT_INJECTION=compaction)")
            n_blocks, head_pages, keep = self._compact(cmd, job)
            self._dump(cmd, keep, job)
            return CompactionResult(cmd.job_id, True, None, time.perf_counter() - t0,
                                    job.clock.seconds, job.clock.prefill_estimate(job.prefix_len),
                                    n_blocks=n_blocks, head_pages=head_pages)
        except Exception as exc:  # reported to the scheduler, which rolls the job back
            logger.warning("kvzip-plugin: compaction of job %d failed: %s", cmd.job_id, exc)
            return CompactionResult(cmd.job_id, False, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)

    def _compact(self, cmd: CompactCommand, job: _JobScores) -> tuple[int, bool, torch.Tensor]:
        """Choose the runs and copy them. Returns (blocks used, head pages?, keep `[layers, H_kv, L]`)."""
        bs = next(iter(self.specs.values())).block_size
        keep = select_runs(job.scores.cpu(), cmd.n_protected, cmd.ratio, cmd.structure, bs)
        tokens = block_table_tokens(keep, cmd.structure, cmd.ratio, self.tp_size)
        if tokens is not None:  # one length everywhere (`head`: what the scheduler reserved), every rank: vLLM's kernel
            dst = cmd.dst_block_ids[:tokens.shape[-1] // bs]
            plan = plan_compaction(tokens, cmd.src_block_ids, dst, bs)
            for name, kv in self.kv_caches.items():
                idx = self.layer_index[name]
                for view in layout.token_major(kv, self.specs[name]):
                    apply_compaction(view, plan.src_slots[idx], plan.dst_slots)
            return len(dst), False, keep
        unplain = next((why for why in self.plain_attention.values() if why), None)
        if unplain:
            raise RuntimeError(f"the {cmd.structure} structure needs the plugin's attention, which does not "
                               f"support {unplain}; use --kv-compression-structure head")
        store_layout = place_runs(keep.sum(-1), bs)
        if store_layout.n_blocks > len(cmd.dst_block_ids):
            raise RuntimeError(f"the store needs {store_layout.n_blocks} blocks, {len(cmd.dst_block_ids)} reserved")
        dst = cmd.dst_block_ids[:store_layout.n_blocks]
        write_store(keep, store_layout, cmd.src_block_ids, dst, self.views)
        self.store_index.add(cmd.job_id, PagedStore.build(store_layout, dst))
        return len(dst), True, keep

    def _dump(self, cmd: CompactCommand, keep: torch.Tensor, job: _JobScores) -> None:
        out = envs.dump_dir()
        if out is None:
            return
        Path(out).mkdir(parents=True, exist_ok=True)
        name = f"job-{cmd.job_id}.pt" if self.tp_size == 1 else f"job-{cmd.job_id}-rank{self.tp_rank}.pt"
        torch.save({"job_id": cmd.job_id, "tp_rank": self.tp_rank, "keep": keep, "scores": job.scores.cpu(),
                    "structure": cmd.structure, "src_block_ids": cmd.src_block_ids, "dst_block_ids": cmd.dst_block_ids,
                    "n_protected": cmd.n_protected, "prefix_len": job.prefix_len},
                   Path(out) / name)


def _tp_rank() -> int:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank())


def rank_head_rows(head_scores: torch.Tensor, local_kv_heads: int, rank: int, tp_size: int) -> torch.Tensor:
    """This rank's columns of `[layers, total KV heads]` head scores. vLLM gives rank r the KV heads
    `[r * H_local, (r + 1) * H_local)`, or, when TP exceeds the KV head count, a replica of head
    `r // (tp_size // total)` (`QKVParallelLinear`). A file of another width is returned as it is (the
    caller's shape check names it)."""
    total = head_scores.shape[1]
    if tp_size == 1 or total == local_kv_heads:
        return head_scores
    if total >= tp_size and total == local_kv_heads * tp_size:
        return head_scores[:, rank * local_kv_heads:(rank + 1) * local_kv_heads]
    if total < tp_size and local_kv_heads == 1 and tp_size % total == 0:
        head = rank // (tp_size // total)
        return head_scores[:, head:head + 1]
    return head_scores


def _unplain(impl: Any) -> str | None:
    """What an attention impl does beyond plain scaled softmax attention (the plugin's head-page
    attention computes only that), or None."""
    if getattr(impl, "alibi_slopes", None) is not None:
        return "ALiBi"
    if getattr(impl, "sliding_window", None) not in (None, -1, (-1, -1)):
        return "sliding-window attention"
    if getattr(impl, "logits_soft_cap", None):
        return "logits soft-capping"
    if getattr(impl, "sinks", None) is not None:
        return "attention sinks"
    return None
