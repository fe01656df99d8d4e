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
  request's prefill chunk), so running requests' steps barely grow;
* `full`: slicing is off (`step_tokens == 0`): scoring runs as the engine schedules it.

Scores do not depend on the slicing: each repeat query's score is a max over the keys before it, and a
prefill split across steps sees exactly the same keys (causal attention), so only timing changes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_STEP_TOKENS = 256
"""Scoring tokens per engine step by default: on a GPU a few ms beside a decode batch; on the 2-core CPU
of CI about the cost of one more small decode batch."""

Decision = Literal["hold", "slice", "full"]


class ScoringBudget(BaseModel):
    """How much scoring work may share an engine step with client requests."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step_tokens: int = Field(DEFAULT_STEP_TOKENS, ge=0)
    """Scoring tokens per step; 0 = no slicing (a scoring prefill runs whole, beside client requests)."""

    max_wait_s: float = Field(2.0, gt=0.0, allow_inf_nan=False)
    """Longest a job's scoring is held back for client prefills before one slice goes through anyway."""


class ScoringGate:
    """Per-step decisions for the scoring work of one engine (`decide`), with counts for logs and metrics."""

    def __init__(self, budget: ScoringBudget) -> None:
        self.budget = budget
        self.held_since: float | None = None
        self.held_steps = 0
        """Steps in which scoring waited for client prefills."""
        self.forced = 0
        """Slices let through after `max_wait_s` although client prefills were pending."""

    def decide(self, client_prefill: bool, now: float) -> Decision:
        """`client_prefill`: a client request waits for admission or has prompt tokens left to compute.
        `now`: a monotonic clock (seconds)."""
        if self.budget.step_tokens == 0:
            return "full"
        if client_prefill:
            if self.held_since is None:
                self.held_since = now
            if now - self.held_since < self.budget.max_wait_s:
                self.held_steps += 1
                return "hold"
            self.forced += 1
        self.held_since = None
        return "slice"

    def idle(self) -> None:
        """No scoring work this step: a later hold starts its wait afresh."""
        self.held_since = None
