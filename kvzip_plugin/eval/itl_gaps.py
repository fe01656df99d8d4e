# SPDX-License-Identifier: Apache-2.0
"""Long inter-token gaps of a client load, and whether other requests' first tokens end them.

A p99 ITL over a few hundred samples is set by its few largest gaps. On a CPU server a decode step that also
prefills newly admitted requests takes as long as their prefill: a request still decoding then sees one long
gap, and it ends when those requests get their first token. Counting the gaps and what ends them tells such
prefill/decode interference (the engine's scheduling, with or without the plugin) apart from other stalls.
Input: the per-request lists of `vllm bench serve --save-detailed` (`start_times`, `ttfts`, `itls`, seconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def itl_gaps(start_times: Sequence[float], ttfts: Sequence[float], itls: Sequence[Sequence[float]],
             threshold_s: float = 0.4, tolerance_s: float = 0.05) -> dict[str, Any]:
    """The inter-token gaps of at least `threshold_s`, each with the number of OTHER requests whose first
    token came within `tolerance_s` of the gap's end.

    Returns:
        `{"threshold_s", "count", "max_s", "ending_at_first_tokens"` (gaps that at least one other request's
        first token ends), `"gaps": [[seconds, first tokens at its end], ...]}` in request order.
    """
    if not (len(start_times) == len(ttfts) == len(itls)):
        raise ValueError("start_times, ttfts and itls must have one entry per request")
    firsts = [s + t for s, t in zip(start_times, ttfts, strict=True)]
    gaps: list[list[float | int]] = []
    for i, (first, request_itls) in enumerate(zip(firsts, itls, strict=True)):
        clock = first
        for gap in request_itls:
            clock += gap
            if gap >= threshold_s:
                n = sum(1 for j, f in enumerate(firsts) if j != i and abs(f - clock) <= tolerance_s)
                gaps.append([round(gap, 4), n])
    return {"threshold_s": threshold_s, "count": len(gaps), "max_s": max((g[0] for g in gaps), default=0.0),
            "ending_at_first_tokens": sum(1 for g in gaps if g[1] > 0), "gaps": gaps}
