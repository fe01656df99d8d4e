# SPDX-License-Identifier: Apache-2.0
"""The per-step decisions for scoring work (`kvzip_plugin.slicing.ScoringGate`): client prefills first,
bounded wait, slices otherwise, no slicing at 0."""

from __future__ import annotations

import pytest

from kvzip_plugin.slicing import ScoringBudget, ScoringGate


def test_client_prefills_hold_scoring_for_a_bounded_time():
    gate = ScoringGate(ScoringBudget(step_tokens=64, max_wait_s=1.0))
    assert gate.decide(False, 0.0) == "slice"
    assert [gate.decide(True, t) for t in (1.0, 1.5, 1.99)] == ["hold"] * 3
    assert gate.decide(True, 2.0) == "slice" and gate.forced == 1  # waited max_wait_s: one slice goes through
    assert gate.decide(True, 2.1) == "hold"  # the wait starts again
    assert gate.decide(False, 2.2) == "slice"
    assert gate.decide(True, 9.0) == "hold"  # a fresh wait after a free step
    gate.idle()
    assert gate.decide(True, 20.0) == "hold" and gate.held_steps == 6


def test_zero_turns_slicing_off():
    gate = ScoringGate(ScoringBudget(step_tokens=0))
    assert gate.decide(True, 0.0) == gate.decide(False, 0.0) == "full" and gate.held_steps == 0


@pytest.mark.parametrize("kwargs", [{"step_tokens": -1}, {"max_wait_s": 0}, {"max_wait_s": float("inf")}])
def test_invalid_budget(kwargs):
    with pytest.raises(ValueError):
        ScoringBudget(**kwargs)
