# SPDX-License-Identifier: Apache-2.0
"""The per-step decisions for scoring work (`kvzip_plugin.slicing.ScoringGate`): client prefills first,
bounded wait, slices otherwise that adapt to the step time, no slicing at 0."""

from __future__ import annotations

import pytest

from kvzip_plugin.slicing import INITIAL_STEP_TOKENS, MIN_STEP_TOKENS, ScoringBudget, ScoringGate


def test_client_prefills_hold_scoring_for_a_bounded_time():
    gate = ScoringGate(ScoringBudget(step_tokens=64, max_wait_s=1.0))
    assert gate.decide(False, True, 0.0) == "slice"
    assert [gate.decide(True, True, t) for t in (1.0, 1.5, 1.99)] == ["hold"] * 3
    assert gate.decide(True, True, 2.0) == "slice" and gate.forced == 1  # waited max_wait_s: one slice
    assert gate.decide(True, True, 2.1) == "hold"  # the wait starts again
    assert gate.decide(False, True, 2.2) == "slice"
    assert gate.decide(True, True, 9.0) == "hold"  # a fresh wait after a free step
    gate.idle(False, False, 9.1)
    assert gate.decide(True, True, 20.0) == "hold" and gate.held_steps == 6


def test_zero_turns_slicing_off():
    gate = ScoringGate(ScoringBudget(step_tokens=0))
    assert gate.decide(True, True, 0.0) == gate.decide(False, True, 0.0) == "full" and gate.held_steps == 0


def _run(gate: ScoringGate, plain_s: float, cost_per_token_s: float, steps: int) -> list[int]:
    """Plain decode steps, then sliced steps whose time grows with the slice; the slices chosen."""
    now = 0.0
    for _ in range(5):
        gate.idle(False, True, now)
        now += plain_s
    sizes = []
    for _ in range(steps):
        assert gate.decide(False, True, now) == "slice"
        sizes.append(gate.step_tokens)
        now += plain_s + cost_per_token_s * gate.step_tokens
    return sizes


def test_slice_shrinks_on_a_slow_machine_and_stays_large_on_a_fast_one():
    # CPU-like: 175 ms decode steps, 3 ms per scoring token: 20 % slowdown allows ~11 tokens
    slow = _run(ScoringGate(ScoringBudget(step_tokens=256)), 0.175, 0.003, 40)
    assert slow[0] == INITIAL_STEP_TOKENS and max(slow) <= 16 and min(slow) >= MIN_STEP_TOKENS
    assert sum(s > 11 for s in slow[-20:]) <= 10  # over the 20 % margin at most every other step
    # GPU-like: 20 ms steps, 5 us per token: 256 tokens cost 1.3 ms, the slice grows to the budget
    fast = _run(ScoringGate(ScoringBudget(step_tokens=256)), 0.020, 0.000005, 20)
    assert fast[0] == INITIAL_STEP_TOKENS and fast == sorted(fast) and fast[-10:] == [256] * 10


@pytest.mark.parametrize("kwargs", [{"step_tokens": -1}, {"max_wait_s": 0}, {"max_wait_s": float("inf")},
                                    {"target_slowdown": 1.0}])
def test_invalid_budget(kwargs):
    with pytest.raises(ValueError):
        ScoringBudget(**kwargs)


def _decode_steps(gate: ScoringGate, now: float, plain_s: float, n: int) -> float:
    for _ in range(n):
        gate.idle(False, True, now)
        now += plain_s
    return now


def test_no_room_beside_decode_means_idle_steps_only_with_a_bounded_wait():
    """CPU-like: even the smallest slice doubles a decode step. After one such step at the smallest slice,
    scoring waits while clients decode (at most `busy_wait_s`: one forced slice), runs in steps without
    clients, and shares decode steps again once a (forced) slice fits."""
    gate = ScoringGate(ScoringBudget(step_tokens=256, busy_wait_s=10.0))
    now = _decode_steps(gate, 0.0, 0.1, 5)
    decisions = []
    for _ in range(6):  # 16 -> 8, then over the target at the smallest slice
        decisions.append(gate.decide(False, True, now))
        now += 0.2 if decisions[-1] == "slice" else 0.1  # a step with a slice takes twice a plain step
    assert decisions == ["slice"] * 2 + ["hold"] * 4 and not gate.share_decode and gate.no_room == 1
    assert gate.step_tokens == MIN_STEP_TOKENS
    start, held = now - 0.4, 0
    while (d := gate.decide(False, True, now)) == "hold":
        held += 1
        now += 0.1
    assert d == "slice" and gate.forced == 1 and now - start >= 10.0 and held > 90  # one slice per busy_wait_s
    now += 0.2  # the forced slice still doubles the step: no room yet
    assert gate.decide(False, True, now) == "hold" and not gate.share_decode
    assert gate.decide(False, False, now + 0.1) == "slice"  # no client: scoring runs
    assert gate.slice_tokens == gate.idle_tokens
    # a client prefill first still holds for max_wait_s only (2 s), not busy_wait_s
    assert gate.decide(True, True, 100.0) == "hold" and gate.decide(True, True, 102.0) == "slice"
    assert gate.forced == 2
    # a forced slice that fits (the machine got faster, or the clients' steps bigger) turns sharing back on
    now = 300.0
    gate.idle(False, True, now)
    now += 0.1
    while gate.decide(False, True, now) == "hold":
        now += 0.1
    now += 0.11  # the forced slice: 1.1x a plain step
    assert gate.decide(False, True, now) == "slice" and gate.share_decode and gate.forced == 3


def test_hold_steps_are_timed_as_client_steps():
    """Steps that held scoring ran client work alone: they keep the plain-decode and prefill means current."""
    gate = ScoringGate(ScoringBudget(step_tokens=64))
    gate.decide(True, False, 0.0)
    gate.decide(True, True, 0.5)  # the first step was a prefill step of 0.5 s
    assert gate.prefill_step_s == 0.5 and gate.plain_step_s is None
    gate.share_decode = False
    assert gate.decide(False, True, 1.0) == "hold"  # no room: a plain decode step of 0.1 s ...
    gate.decide(False, True, 1.1)  # ... measured when the next step is scheduled
    assert gate.plain_step_s == pytest.approx(0.1) and gate.prefill_step_s == 0.5


def _idle_slices(gate: ScoringGate, prefill_s: float, cost_per_token_s: float, steps: int) -> list[int]:
    """One client prefill step, then steps where scoring runs alone; the idle slices chosen."""
    gate.idle(True, False, 0.0)
    now = prefill_s
    sizes = []
    for _ in range(steps):
        assert gate.decide(False, False, now) == "slice"
        sizes.append(gate.slice_tokens)
        now += 0.01 + cost_per_token_s * gate.slice_tokens
    return sizes


def test_idle_slices_keep_a_new_requests_wait_within_the_target_share_of_a_prefill():
    # a client prefill step takes 1 s; a scoring slice 10 ms + 5 ms per token: 0.2 s allows ~38 tokens
    sizes = _idle_slices(ScoringGate(ScoringBudget(step_tokens=256)), 1.0, 0.005, 40)
    assert sizes[0] == INITIAL_STEP_TOKENS and max(sizes) <= 57 and min(sizes) >= MIN_STEP_TOKENS
    assert sum(0.01 + 0.005 * s > 0.2 for s in sizes[-20:]) <= 10  # over the margin at most every other step
    # fast: 1 s prefill steps, 0.1 ms per token: the slice grows to the budget
    fast = _idle_slices(ScoringGate(ScoringBudget(step_tokens=256)), 1.0, 0.0001, 20)
    assert fast == sorted(fast) and fast[-5:] == [256] * 5
    # no client prefill measured yet: nothing to protect, the slice stays where it is (no timing to adapt to)
    gate = ScoringGate(ScoringBudget(step_tokens=256))
    assert [gate.decide(False, False, t) for t in (0.0, 5.0)] == ["slice"] * 2 and gate.slice_tokens == 16
