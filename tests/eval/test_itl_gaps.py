# SPDX-License-Identifier: Apache-2.0
"""itl_gaps: long inter-token gaps found where they are, and attributed to other requests' first tokens only
when those come at the gap's end."""

from __future__ import annotations

import pytest

from kvzip_plugin.eval.itl_gaps import itl_gaps


def test_a_gap_ended_by_admitted_prefills_and_one_that_is_not():
    # request 0: first token at 1.0, then 0.1, a 1.2-s gap ending at 2.3, 0.1, a 0.5-s gap ending at 2.9
    # requests 1 and 2: sent at 1.1, first tokens at 2.3 (their prefill was the long step); request 3 at 5.0
    got = itl_gaps([0.0, 1.1, 1.1, 4.0], [1.0, 1.2, 1.21, 1.0], [[0.1, 1.2, 0.1, 0.5], [0.1], [0.1], [0.1]])
    assert got["count"] == 2 and got["max_s"] == 1.2
    assert got["gaps"] == [[1.2, 2], [0.5, 0]]
    assert got["ending_at_first_tokens"] == 1


def test_short_gaps_and_the_request_itself_do_not_count():
    got = itl_gaps([0.0], [1.0], [[0.39, 0.2]])
    assert got == {"threshold_s": 0.4, "count": 0, "max_s": 0.0, "ending_at_first_tokens": 0, "gaps": []}


def test_lists_must_match():
    with pytest.raises(ValueError, match="one entry per request"):
        itl_gaps([0.0, 1.0], [1.0], [[0.1]])
