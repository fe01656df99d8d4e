# SPDX-License-Identifier: Apache-2.0
"""Scoring as a low-priority workload: when a compression job's scoring tokens may run, and how many.

A job's scoring requests are long prefills (the prefix is a cache hit; the "repeat the context" input,
up to `KVzipConfig.chunk_size` tokens plus the prompt, is computed). Run in one step beside client
requests, such a prefill stalls every request that shares the step. So each step, the engine glue asks
the gate:

* `hold`: client work comes first. A client request waits for admission or is still prefilling (at most
  `max_wait_s`), or clients decode and no slice fits beside them (`share_decode` off, at most
  `busy_wait_s`): scoring gets no token this step. After the wait one slice goes through anyway (counted in
  `forced`), so a job finishes under any load;
* `slice`: scoring may run, at most `slice_tokens` of it in this step (the engine caps the scoring request's
  prefill chunk): `step_tokens` beside decoding clients, `idle_tokens` in a step without clients;
* `full`: slicing is off (`ScoringBudget.step_tokens == 0`): scoring runs as the engine schedules it.

Both slices adapt to measured step times (running means of the client-only steps, kept by kind):

* beside decoding clients: after a step where clients decoded beside a slice, the slice halves if that step
  took more than `target_slowdown` times a plain decode step, grows by half if it stayed within half that
  margin, and stays otherwise, between `MIN_STEP_TOKENS` and the budget's `step_tokens`, starting small
  (`INITIAL_STEP_TOKENS`: a first slice of the full budget stalled the clients for a second on a CPU). When
  even the smallest slice breaks the target (`NO_ROOM_STRIKES`) there is no room in the decode steps (a CPU: a
  scoring step's fixed cost alone doubles a small decode step), and scoring waits for steps without clients
  (`share_decode` off); a forced slice re-measures, and turns sharing back on if it fits;
* in a step without clients (the gaps of a partly loaded server), the slice is sized so that its step takes
  at most `target_slowdown - 1` of a client prefill step: a request that arrives during it waits at most
  that share of its own prefill (its TTFT). On an idle server the job would otherwise run each scoring
  prefill whole, and a request arriving then waited for all of it.

So running requests' inter-token latency and new requests' TTFT stay within about `target_slowdown` of the
same load without a job, on a fast GPU (slices ride in the decode steps) and on a slow CPU (slices fill
the idle gaps) alike; under a load that never leaves the server idle, a CPU job goes on by one forced slice
per `busy_wait_s`.

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

DEFAULT_TARGET_SLOWDOWN = 1.2
"""Step time with a slice / without, that the adaptive slices aim to stay under (issue 17's target)."""

NO_ROOM_STRIKES = 1
"""Steps over the target at the smallest slice after which no slice fits beside decoding clients: one, since
each such step slowed every running request (a CPU job's first three slices doubled the p99 inter-token
latency of a short load with two strikes); a wrong call costs one forced slice per `busy_wait_s`, which
re-measures."""

DEFAULT_BUSY_WAIT_S = 30.0
"""Longest wait for room beside decoding clients, where even the smallest slice breaks the target: under a
load that never leaves the server idle, a job goes on by one small slice per this many seconds (well under
1 % of a CPU's decode steps, so the clients' p99 inter-token latency stays put)."""

Decision = Literal["hold", "slice", "full"]


class ScoringBudget(BaseModel):
    """How much scoring work may share an engine step with client requests."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step_tokens: int = Field(DEFAULT_STEP_TOKENS, ge=0)
    """Largest slice of scoring tokens per step; 0 = no slicing (a scoring prefill runs whole, beside client
    requests)."""

    max_wait_s: float = Field(2.0, gt=0.0, allow_inf_nan=False)
    """Longest a job's scoring is held back for client prefills before one slice goes through anyway."""

    busy_wait_s: float = Field(DEFAULT_BUSY_WAIT_S, gt=0.0, allow_inf_nan=False)
    """Longest a job's scoring is held back for decoding clients, where no slice fits beside them within
    `target_slowdown`, before one slice goes through anyway (that slice also re-measures the room)."""

    target_slowdown: float = Field(DEFAULT_TARGET_SLOWDOWN, gt=1.0, allow_inf_nan=False)
    """Largest step-time slowdown scoring may cause: the step time of a step with a slice over the same
    clients' steps without one; and an idle step's slice time over `target_slowdown - 1` of a client prefill
    step (the TTFT of a request that arrives during it)."""


class ScoringGate:
    """Per-step decisions for the scoring work of one engine (`decide`), the adaptive slices (`step_tokens`
    beside decoding clients, `idle_tokens` in idle steps; `slice_tokens`: this step's), and counts for logs
    and metrics."""

    def __init__(self, budget: ScoringBudget) -> None:
        self.budget = budget
        self.step_tokens = min(budget.step_tokens, INITIAL_STEP_TOKENS)
        """The slice beside decoding clients (adapted between `MIN_STEP_TOKENS` and `budget.step_tokens`)."""
        self.idle_tokens = min(budget.step_tokens, INITIAL_STEP_TOKENS)
        """The slice of a step without clients (adapted between `MIN_STEP_TOKENS` and `budget.step_tokens`)."""
        self.slice_tokens = self.step_tokens
        """The slice of the step just decided (`step_tokens` or `idle_tokens`)."""
        self.share_decode = True
        """Slices may share steps with decoding clients: False while the smallest slice made those steps slower
        than `target_slowdown` (then scoring waits for idle steps, `busy_wait_s` at most)."""
        self.plain_step_s: float | None = None
        """Running mean of steps where clients decoded without scoring."""
        self.prefill_step_s: float | None = None
        """Running mean of steps that computed client prompt tokens without scoring."""
        self.held_since: float | None = None  # scoring waits for client prefills since
        self.busy_since: float | None = None  # scoring waits for room beside decoding clients since
        self.held_steps = 0
        """Steps in which scoring waited for client work (client prefills, or decoding clients without room)."""
        self.forced = 0
        """Slices let through after a bounded wait although client work was pending."""
        self.no_room = 0
        """Times slices were found not to fit beside decoding clients (`share_decode` turned off)."""
        self._over_at_min = 0  # consecutive over-target steps at the smallest slice
        self._last: tuple[str | None, float] | None = None  # (kind of the step being run, when it was scheduled)

    @staticmethod
    def _mean(old: float | None, new: float) -> float:
        return new if old is None else 0.8 * old + 0.2 * new

    def _resized(self, tokens: int, over: bool, within_half: bool) -> int:
        """A slice after a step it took part in: halved when the step was over its bound, grown by half when
        it stayed within half of it, else kept; between `MIN_STEP_TOKENS` and the budget's `step_tokens`."""
        if over:
            return max(MIN_STEP_TOKENS, tokens // 2)
        if within_half:
            return min(self.budget.step_tokens, tokens + max(1, tokens // 2))
        return tokens

    def _observe(self, now: float) -> None:
        """Time the previous step (scheduled at `_last[1]`, measured now) by its kind."""
        if self._last is None:
            return
        kind, started = self._last
        elapsed = now - started
        target, lo = self.budget.target_slowdown, 1 + (self.budget.target_slowdown - 1) / 2
        if kind == "plain":
            self.plain_step_s = self._mean(self.plain_step_s, elapsed)
        elif kind == "prefill":
            self.prefill_step_s = self._mean(self.prefill_step_s, elapsed)
        elif kind == "slice" and self.plain_step_s is not None:
            slowdown = elapsed / self.plain_step_s
            if slowdown > target:
                if self.step_tokens <= MIN_STEP_TOKENS:
                    self._over_at_min += 1
                    if self._over_at_min >= NO_ROOM_STRIKES and self.share_decode:
                        self.share_decode = False
                        self.no_room += 1
            else:
                self._over_at_min = 0
                self.share_decode = True
            self.step_tokens = self._resized(self.step_tokens, slowdown > target, slowdown <= lo)
        elif kind == "idle" and self.prefill_step_s is not None:
            allowed = (target - 1) * self.prefill_step_s
            self.idle_tokens = self._resized(self.idle_tokens, elapsed > allowed, elapsed <= allowed / 2)

    @staticmethod
    def _client_kind(client_prefill: bool, clients_decoding: bool) -> str | None:
        return "prefill" if client_prefill else "plain" if clients_decoding else None

    @staticmethod
    def _waited(since: float | None, wait_s: float, now: float) -> tuple[float, bool]:
        since = now if since is None else since
        return since, now - since >= wait_s

    def decide(self, client_prefill: bool, clients_decoding: bool, now: float) -> Decision:
        """This step's decision for scoring work that is waiting to run (and `slice_tokens` for a slice).

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
            self.held_since, due = self._waited(self.held_since, self.budget.max_wait_s, now)
        elif clients_decoding and not self.share_decode:
            self.held_since = None
            self.busy_since, due = self._waited(self.busy_since, self.budget.busy_wait_s, now)
        else:
            due = None
        if due is False:
            self.held_steps += 1
            decision = "hold"
        elif due:
            self.forced += 1
        if decision == "slice":
            self.held_since = self.busy_since = None
            idle = not client_prefill and not clients_decoding
            self.slice_tokens = self.idle_tokens if idle else self.step_tokens
            kind = "idle" if idle else None if client_prefill else "slice"
        else:  # a step of client work alone: timed as such
            kind = self._client_kind(client_prefill, clients_decoding)
        self._last = (kind, now)
        return decision

    def idle(self, client_prefill: bool, clients_decoding: bool, now: float) -> None:
        """A step without scoring work: timed as a client step; a later hold starts its wait afresh."""
        self._observe(now)
        self.held_since = self.busy_since = None
        self._last = (self._client_kind(client_prefill, clients_decoding), now)
