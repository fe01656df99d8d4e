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
