# SPDX-License-Identifier: Apache-2.0
"""Scoring as a low-priority workload: when a compression job's scoring tokens may run, and how many.

A job's scoring requests are long prefills (the prefix is a cache hit; the "repeat the context" input,
up to `KVzipConfig.chunk_size` tokens plus the prompt, is computed). Run in one step beside client
requests, such a prefill stalls every request that shares the step. So each step, the engine glue asks
the gate:

* `hold`: a client request is waiting for admission or still prefilling: scoring gets no token this step
  (client work first). A hold lasts at most `max_wait_s`; then one slice goes through anyway, so a job
  finishes under a steady load (bounded wait, counted in `forced`);
* `slice`: scoring may run, at most `step_tokens` of it in this step (the engine caps the scoring
  request's prefill chunk);
* `full`: slicing is off (`ScoringBudget.step_tokens == 0`): scoring runs as the engine schedules it.

The slice adapts to the step time: the gate times each step (the interval between the engine's
consecutive scheduling calls) and keeps a running mean of the steps where clients decode without
scoring; after a step where clients decoded beside a slice, the slice halves if that step took more
than `target_slowdown` times the mean, grows by half if it stayed within half that margin, and stays
otherwise, between `MIN_STEP_TOKENS` and the budget's `step_tokens`, starting small
(`INITIAL_STEP_TOKENS`: a first slice of the full budget stalled the clients for a second on a CPU). So the
running requests' inter-token latency stays within about
`target_slowdown` of the same load without a job on a fast GPU and on a slow CPU alike.

Scores do not depend on the slicing: each repeat query's score is a max over the keys before it, and a
prefill split across steps sees exactly the same keys (causal attention), so only timing changes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_STEP_TOKENS = 256
"""Largest slice by default."""

MIN_STEP_TOKENS = 8
"""Smallest adaptive slice: a job always progresses by this much per step it is allowed."""

INITIAL_STEP_TOKENS = 16
"""First slice (then adapted): small, since the step time it adds is unknown until measured."""

Decision = Literal["hold", "slice", "full"]


class ScoringBudget(BaseModel):
    """How much scoring work may share an engine step with client requests."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step_tokens: int = Field(DEFAULT_STEP_TOKENS, ge=0)
    """Largest slice of scoring tokens per step; 0 = no slicing (a scoring prefill runs whole, beside client
    requests)."""

    max_wait_s: float = Field(2.0, gt=0.0, allow_inf_nan=False)
    """Longest a job's scoring is held back for client prefills before one slice goes through anyway."""

    target_slowdown: float = Field(1.2, gt=1.0, allow_inf_nan=False)
    """Step time with a slice / without, that the adaptive slice aims to stay under."""


class ScoringGate:
    """Per-step decisions for the scoring work of one engine (`decide`), the adaptive slice (`step_tokens`),
    and counts for logs and metrics."""

    def __init__(self, budget: ScoringBudget) -> None:
        self.budget = budget
        self.step_tokens = min(budget.step_tokens, INITIAL_STEP_TOKENS)
        """The current slice (adapted between `MIN_STEP_TOKENS` and `budget.step_tokens`)."""
        self.plain_step_s: float | None = None
        """Running mean of steps where clients decoded without scoring."""
        self.held_since: float | None = None
        self.held_steps = 0
        """Steps in which scoring waited for client prefills."""
        self.forced = 0
        """Slices let through after `max_wait_s` although client prefills were pending."""
        self._last: tuple[str | None, float] | None = None  # (kind of the step being run, when it was scheduled)

    def _observe(self, now: float) -> None:
        """Time the previous step (scheduled at `_last[1]`, measured now) by its kind."""
        if self._last is None:
            return
        kind, started = self._last
        elapsed = now - started
        if kind == "plain":
            self.plain_step_s = elapsed if self.plain_step_s is None else 0.8 * self.plain_step_s + 0.2 * elapsed
        elif kind == "slice" and self.plain_step_s is not None:
            slowdown = elapsed / self.plain_step_s
            if slowdown > self.budget.target_slowdown:
                self.step_tokens = max(MIN_STEP_TOKENS, self.step_tokens // 2)
            elif slowdown <= 1 + (self.budget.target_slowdown - 1) / 2:
                self.step_tokens = min(self.budget.step_tokens, self.step_tokens + max(1, self.step_tokens // 2))

    def decide(self, client_prefill: bool, clients_decoding: bool, now: float) -> Decision:
        """This step's decision for scoring work that is waiting to run.

        Args:
            client_prefill: a client request waits for admission or has prompt tokens left to compute.
            clients_decoding: client requests are decoding (they share the step with a slice).
            now: a monotonic clock (seconds).
        """
        self._observe(now)
        if self.budget.step_tokens == 0:
            self._last = None
            return "full"
        decision: Decision = "slice"
        if client_prefill:
            if self.held_since is None:
                self.held_since = now
            if now - self.held_since < self.budget.max_wait_s:
                self.held_steps += 1
                decision = "hold"
            else:
                self.forced += 1
        if decision == "slice":
            self.held_since = None
        kind = "slice" if decision == "slice" and clients_decoding and not client_prefill else None
        self._last = (kind, now)
        return decision

    def idle(self, client_prefill: bool, clients_decoding: bool, now: float) -> None:
        """A step without scoring work: timed as a plain step when clients only decode in it; a later hold
        starts its wait afresh."""
        self._observe(now)
        self.held_since = None
        self._last = ("plain" if clients_decoding and not client_prefill else None, now)
