# SPDX-License-Identifier: Apache-2.0
"""KVzip's scoring requests as a low-priority, sliced workload inside SGLang's scheduler (the decisions:
`kvzip_plugin.slicing.ScoringGate`, shared with vLLM).

SGLang runs a prefill batch whenever one can be formed, ahead of decoding its running batch, and a prefill
batch carries no decode rows (without `--enable-mixed-chunk`): a scoring request's prefill run whole stops
every decoding client for as long as it runs. Per scheduling round (AROUND `Scheduler.get_next_batch_to_run`,
`hooks.py`), with one scoring request of a job in the waiting queue at a time (`scheduling.Jobs`):

* `hold` (a client request waits for admission or is being prefilled in chunks; or clients decode and no
  slice fits beside them, `ScoringGate.share_decode`): a scoring request not started yet is taken out of
  the waiting queue for the round; at most `max_wait_s` (`busy_wait_s` for decoding clients), then one slice
  goes through (counted as forced). A scoring request already started sits the round out: beside a client
  prefill it is parked (AROUND `PrefillAdder.add_chunked_req`, which then adds nothing, as SGLang's own
  early return does; the chunk counter SGLang raises for it is put back), so the client prefills alone and
  its first token does not wait for a slice; beside decoding clients alone, the round defers prefill
  (below), so they decode and it waits;
* `slice`: the scoring request's chunk is capped at the gate's adaptive slice (`slice_tokens`: the one
  beside clients, or the idle one when no client decodes or waits): its first chunk through
  `PrefillAdder.add_one_req` (its `rem_chunk_tokens` lowered for that call), its next ones through
  `SchedulePolicy.shortest_prefill_chunk_limit` (the limit SGLang applies to the chunked request). Client
  requests that fit in the rest of the round's budget join the batch; one that would need a chunk of its
  own waits (SGLang tracks one chunked request at a time), at most `max_wait_s`: after that the scoring
  request runs at SGLang's own chunk size until it ends (drain);
* interleave: after a round that ran a slice while clients decode and none waits, the next round defers
  prefill (AROUND `Scheduler._should_defer_prefill`, SGLang's own prefill/decode interval), so decoding
  clients get a step between two slices;
* `full` (slicing off, or chunked prefill off: SGLang cannot split a prefill then): unchanged.

The slice adapts as on vLLM: the gate times each round against client-only decode rounds. Where SGLang runs
prefill and decode in separate batches, a client's inter-token time during a job is about one decode step
plus one slice step (vLLM puts both in one step).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kvzip_plugin.settings import KVCompressionSettings
from kvzip_plugin.slicing import Decision, ScoringBudget, ScoringGate

logger = logging.getLogger("sglang.kvzip_plugin")


def scoring_budget(settings: KVCompressionSettings, server_args: Any) -> ScoringBudget:
    """The scoring budget of the settings (`--kv-compression-scoring-step-tokens`, `-max-slowdown`), on every
    backend. (SGLang's CPU backend `torch_native` computes an extend chunk over the request's whole sequence,
    which made a slice cost a whole prefill; `native_backend.py` computes the scoring rows' chunks over their
    new rows only, so slices cost their tokens there too.)"""
    return settings.scoring_budget()


def _is_scoring(req: Any) -> bool:
    from kvzip_plugin.integrations.sglang.scheduling import is_scoring_rid

    return req is not None and is_scoring_rid(getattr(req, "rid", None))


class Slicing:
    """The slicing state of one cache (scheduler thread only)."""

    def __init__(self, budget: ScoringBudget, page_size: int) -> None:
        self.gate = ScoringGate(budget)
        self.page_size = page_size
        self.cap: int | None = None
        """This round's slice (tokens) for the scoring request's chunk; None: SGLang's own chunk size."""
        self.capped_continuation = False  # this round capped the chunked scoring request's next chunk
        self.defer_next = False  # the next round decodes instead of running another slice
        self.deferring = False  # this round is that decode round (read by `defer_prefill`)
        self.blocked_since: float | None = None  # a client needing its own chunk waits behind a slice
        self.drain = False  # the current scoring request runs at SGLang's chunk size until it ends
        self.parking: Any = None  # this round's started scoring request, kept out of a client prefill batch
        self.parked = 0
        self.slices = 0
        self.deferred = 0
        self.drained = 0

    # ------------------------------------------------------------------ per round

    def round(self, original, sched: Any, running_batch: Any, last_batch: Any, *args: Any, **kwargs: Any):
        """`Scheduler.get_next_batch_to_run` with this round's decision applied."""
        now = time.monotonic()
        chunked = getattr(sched, "chunked_req", None)
        scoring_chunked = _is_scoring(chunked)
        waiting, client_waits = [], False
        for r in sched.waiting_queue:
            if _is_scoring(r):
                waiting.append(r)
            else:
                client_waits = True
        client_prefill = (chunked is not None and not scoring_chunked) or client_waits
        decoding = _clients_decode(running_batch, last_batch, chunked)
        self.cap, self.capped_continuation = None, False
        if not waiting and not scoring_chunked:
            self.gate.idle(client_prefill, decoding, now)
            self.drain, self.blocked_since, self.defer_next = False, None, False
            return original(sched, running_batch, last_batch, *args, **kwargs)
        if self.defer_next and decoding and not client_prefill:
            self.defer_next = False
            self.gate.idle(False, decoding, now)  # a decode round between two slices: a plain step
            self.deferring = True
            try:
                return original(sched, running_batch, last_batch, *args, **kwargs)
            finally:
                self.deferring = False
        self.defer_next = False
        chunking = (getattr(sched, "chunked_prefill_size", None) or 0) > 0
        decision: Decision = self.gate.decide(client_prefill, decoding, now) if chunking else "full"
        if decision == "hold" and scoring_chunked and decoding and not client_prefill:
            # no room beside the decoding clients: the started scoring request waits, they decode
            self.deferring = True
            try:
                return original(sched, running_batch, last_batch, *args, **kwargs)
            finally:
                self.deferring = False
        if decision == "hold" and scoring_chunked and client_prefill and not self.drain:
            return self._park(original, sched, chunked, running_batch, last_batch, *args, **kwargs)
        if decision != "full" and not self.drain:
            tokens = self.gate.slice_tokens if decision == "slice" else self.gate.step_tokens
            self.cap = max(self.page_size, tokens // self.page_size * self.page_size)
        held = waiting if decision == "hold" else []
        if held:
            ids = {id(r) for r in held}
            sched.waiting_queue[:] = [r for r in sched.waiting_queue if id(r) not in ids]
        try:
            plan = original(sched, running_batch, last_batch, *args, **kwargs)
        finally:
            self.cap = None
            if held:
                sched.waiting_queue.extend(held)
        batch = getattr(plan, "batch_to_run", None)
        if batch is not None and batch.forward_mode.is_extend() and any(_is_scoring(r) for r in batch.reqs):
            self.slices += 1
            self.defer_next = decoding
        return plan

    def _park(self, original, sched: Any, chunked: Any, *args: Any, **kwargs: Any):
        """A round in which client requests prefill and the started scoring request `chunked` waits: SGLang's
        `add_chunked_req` adds nothing for it (`add_chunked_req` below), and SGLang's count of its chunks in
        flight, raised for every prefill batch formed while it is the chunked request, is put back (no chunk
        of it runs; the count gates when its output is committed)."""
        before = chunked.inflight_middle_chunks
        self.parking = chunked
        try:
            plan = original(sched, *args, **kwargs)
        finally:
            self.parking = None
        batch = getattr(plan, "batch_to_run", None)
        ran = batch is not None and any(r is chunked for r in batch.reqs)
        if not ran and chunked.inflight_middle_chunks == before + 1:
            chunked.inflight_middle_chunks = before
        if batch is not None and any(not _is_scoring(r) for r in batch.reqs):
            self.parked += 1  # a round a client's prefill got while the scoring request waited
        return plan

    def add_chunked_req(self, original, adder: Any, req: Any, *args: Any, **kwargs: Any):
        """`PrefillAdder.add_chunked_req`: the parked scoring request is returned unchanged and adds nothing
        (SGLang's own early return when no chunk fits); every other call as SGLang does it."""
        if self.parking is not None and req is self.parking:
            return req
        return original(adder, req, *args, **kwargs)

    def defer_prefill(self, original, sched: Any, running_batch: Any, *args: Any, **kwargs: Any) -> bool:
        """`Scheduler._should_defer_prefill`: True in the decode round between two slices, and in a round
        that holds a started scoring request for decoding clients."""
        if self.deferring and any(not _is_scoring(r) for r in running_batch.reqs):
            self.deferred += 1
            return True
        return original(sched, running_batch, *args, **kwargs)

    # ------------------------------------------------------------------ inside SGLang's prefill adder

    def add_one_req(self, original, adder: Any, req: Any, *args: Any, **kwargs: Any):
        """`PrefillAdder.add_one_req`: the scoring request's first chunk at most `cap` tokens; a client that
        would need its own chunk beside a capped or parked scoring request waits (SGLang tracks one chunked
        request at a time)."""
        rem = adder.rem_chunk_tokens
        if rem is None or (self.cap is None and self.parking is None):
            return original(adder, req, *args, **kwargs)
        if _is_scoring(req):
            if self.cap is None:
                return original(adder, req, *args, **kwargs)
            cap = min(rem, self.cap)
            adder.rem_chunk_tokens = cap
            try:
                return original(adder, req, *args, **kwargs)
            finally:
                adder.rem_chunk_tokens = rem - (cap - adder.rem_chunk_tokens)
        if self.parking is not None or self.capped_continuation or _is_scoring(adder.new_chunked_req):
            extend = len(req.full_untruncated_fill_ids) - req.prefix_len
            if adder.ceil_paged_tokens(extend) > rem:
                from sglang.srt.managers.schedule_policy import AddReqResult

                self._blocked(time.monotonic())
                return AddReqResult.OTHER
        return original(adder, req, *args, **kwargs)

    def chunk_limit(self, original, policy: Any, chunked_req: Any, *args: Any, **kwargs: Any):
        """`SchedulePolicy.shortest_prefill_chunk_limit`: the chunked scoring request's next chunk at most
        `cap` tokens (page-aligned, as SGLang's own limit)."""
        limit = original(policy, chunked_req, *args, **kwargs)
        if self.cap is None or not _is_scoring(chunked_req):
            return limit
        self.capped_continuation = True
        return self.cap if limit is None else min(limit, self.cap)

    def _blocked(self, now: float) -> None:
        if self.blocked_since is None:
            self.blocked_since = now
        elif now - self.blocked_since >= self.gate.budget.max_wait_s and not self.drain:
            self.drain = True
            self.drained += 1
            logger.info("kvzip-plugin: a client waited %.1f s behind scoring slices; the scoring request runs at "
                        "SGLang's chunk size until it ends", now - self.blocked_since)

    def describe(self) -> dict[str, Any]:
        """Counts for the state dump and the job log."""
        g = self.gate
        return {"step_tokens": g.step_tokens, "idle_tokens": g.idle_tokens, "share_decode": g.share_decode,
                "no_room": g.no_room, "slices": self.slices, "held_steps": g.held_steps, "forced": g.forced,
                "deferred": self.deferred, "parked": self.parked, "drained": self.drained}


def _clients_decode(running_batch: Any, last_batch: Any, chunked: Any) -> bool:
    """Client requests decode in the coming round: in the running batch, or finishing their prefill in the
    last batch (merged into the running batch by this round)."""
    if any(not _is_scoring(r) for r in getattr(running_batch, "reqs", ()) or ()):
        return True
    if last_batch is not None and last_batch.forward_mode.is_extend():
        return any(not _is_scoring(r) and r is not chunked and not r.finished() for r in last_batch.reqs)
    return False
