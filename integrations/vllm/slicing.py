# SPDX-License-Identifier: Apache-2.0
"""KVzip's scoring requests as a low-priority, sliced workload inside vLLM's scheduler (the decisions:
`kvzip_plugin.slicing.ScoringGate`).

Around each `Scheduler.schedule()` call (the connector's `schedule` wrapper), after the scheduler state
handed vLLM at most one scoring request at a time (`SchedulerState.before_schedule`):

* `hold` (a client request waits for admission or is still prefilling, or clients decode and no slice fits
  beside them: `ScoringGate.share_decode`): the scoring requests are taken
  out of `scheduler.running` / `scheduler.waiting` for this call and put back after it (at the end of
  `running`: the first to be preempted), and `max_num_active_reqs` is lowered by the running ones for the
  call, since they keep their rows (else vLLM would admit past `max_num_seqs`). vLLM schedules client work
  alone; a running request that is not scheduled in a step is ordinary for vLLM (it happens whenever the
  token budget runs out);
* `slice`: the call runs with `scheduler_config.long_prefill_token_threshold` lowered to the gate's
  adaptive slice (or the user's own threshold if lower) and vLLM's adaptive floor off, restored after. Client prefills
  would have held the step, so only the scoring request's prefill chunk is cut (except in a slice forced
  after the bounded wait). vLLM applies that cap only when more than one request is eligible, so in a step
  without clients the call runs with `max_num_scheduled_tokens` (the step's token budget) lowered to the
  gate's idle slice instead, restored after: on an idle server the scoring prefill would otherwise run whole
  and a request arriving meanwhile wait for all of it;
* `full` (slicing off, or chunked prefill off: vLLM cannot split a prefill then): unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kvzip_plugin.slicing import Decision, ScoringGate


def _is_scoring(request: Any) -> bool:
    from kvzip_plugin.integrations.vllm.scheduler import is_scoring_request

    return is_scoring_request(request.request_id)


def client_activity(scheduler: Any) -> tuple[bool, bool]:
    """(a client request waits for admission or has prompt tokens left to compute, client requests decode)."""
    waiting = list(scheduler.waiting) + list(getattr(scheduler, "kv_holding_waiting", ()))
    prefill = any(not _is_scoring(r) for r in waiting)
    decoding = False
    for r in scheduler.running:
        if not _is_scoring(r):
            if r.num_computed_tokens < r.num_prompt_tokens:
                prefill = True
            else:
                decoding = True
    return prefill, decoding


@contextmanager
def scoring_step(gate: ScoringGate, scheduler: Any, chunked_prefill: bool) -> Iterator[Decision | None]:
    """Apply this step's decision to `scheduler` for the duration of its `schedule()` call; yields it
    (None when no scoring request is in the scheduler). With slicing off nothing is read or changed."""
    if gate.budget.step_tokens == 0:  # every decision would be "full": skip the walk over the requests
        yield "full"
        return
    running = [r for r in scheduler.running if _is_scoring(r)]
    waiting = [r for r in scheduler.waiting if _is_scoring(r)]
    prefill, decoding = client_activity(scheduler)
    if not running and not waiting:
        gate.idle(prefill, decoding, time.monotonic())
        yield None
        return
    decision: Decision = gate.decide(prefill, decoding, time.monotonic()) if chunked_prefill else "full"
    if decision == "hold":
        scheduler.running[:] = [r for r in scheduler.running if not _is_scoring(r)]
        for r in waiting:
            scheduler.waiting.remove_request(r)
        active = scheduler.max_num_active_reqs
        scheduler.max_num_active_reqs = active - len(running)  # the held requests keep their rows
        try:
            yield decision
        finally:
            scheduler.max_num_active_reqs = active
            scheduler.running.extend(r for r in running if r.request_id in scheduler.requests)
            for r in waiting:
                if r.request_id in scheduler.requests:
                    scheduler.waiting.add_request(r)
        return
    if decision == "full":
        yield decision
        return
    step = gate.slice_tokens
    if not prefill and not decoding:  # the scoring request alone: vLLM would run its prefill whole
        budget = scheduler.max_num_scheduled_tokens
        scheduler.max_num_scheduled_tokens = min(budget, step)
        try:
            yield decision
        finally:
            scheduler.max_num_scheduled_tokens = budget
        return
    config = scheduler.scheduler_config
    threshold, adaptive = config.long_prefill_token_threshold, scheduler.adaptive_long_prefill_threshold
    config.long_prefill_token_threshold = step if threshold == 0 else min(threshold, step)
    scheduler.adaptive_long_prefill_threshold = False
    try:
        yield decision
    finally:
        config.long_prefill_token_threshold = threshold
        scheduler.adaptive_long_prefill_threshold = adaptive
