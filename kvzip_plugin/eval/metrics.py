# SPDX-License-Identifier: Apache-2.0
"""Evaluation tooling for the benchmarks: answer scoring (SQuAD, HotpotQA, RULER) and the statistics that tell a
difference from noise (no dependencies beyond the standard library).

- `normalize_answer`, `exact_match`, `f1_score`, `max_over_golds`: as the official SQuAD v1.1 / v2.0
  evaluation script defines them (lowercase, strip punctuation, drop the articles a/an/the, collapse
  whitespace; token F1 on the normalised words; the max over a question's gold answers).
- `hotpot_f1` (HotpotQA's F1, its yes/no rule), `string_match` (RULER's), and `score_text`, which picks
  the metric of a data-set family (`ANSWER_METRICS`).
- `wilson_interval`: 95% interval of a proportion (EM); `bootstrap_interval`: seeded percentile
  bootstrap of a mean (F1).
- `paired_flips`: two runs on the same questions: how many go right -> wrong and wrong -> right, and
  the exact two-sided sign-test (McNemar) p-value of the discordant pairs.
"""

from __future__ import annotations

import collections
import math
import random
import re
import string
from collections.abc import Callable, Sequence

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_YES_NO = frozenset(("yes", "no", "noanswer"))


def normalize_answer(text: str) -> str:
    """Lowercase, remove punctuation, remove articles, collapse whitespace (SQuAD's `normalize_answer`)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact_match(prediction: str, gold: str) -> int:
    """1 when the normalised strings are equal, else 0."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token F1 of the normalised words (SQuAD v2.0's `compute_f1`: an empty side scores 1 only
    when both are empty)."""
    pred, ref = _tokens(prediction), _tokens(gold)
    if not pred or not ref:
        return float(pred == ref)
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def hotpot_f1(prediction: str, gold: str) -> float:
    """HotpotQA's answer F1 (`hotpot_evaluate_v1.f1_score`): SQuAD's token F1, except that a yes / no /
    noanswer on either side scores 0 unless both normalise to the same string."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if (pred in _YES_NO or ref in _YES_NO) and pred != ref:
        return 0.0
    return f1_score(prediction, gold)


def string_match(prediction: str, gold: str) -> int:
    """RULER's `string_match_all` for one reference: 1 when the gold appears in the prediction,
    case-insensitive."""
    return int(gold.lower() in prediction.lower())


ANSWER_METRICS: dict[str, str] = {
    "squad_group": "SQuAD v2.0 EM / token F1, max over golds",
    "hotpotqa_group": "HotpotQA EM / F1 (its yes/no rule)",
    "ruler_niah": "RULER string_match_all (the value appears in the answer); f1 = that score",
}
"""What `score_text` reports for each free-form data-set family."""


def score_text(family: str, prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """`{"em", "f1"}` of a free-form answer by its family's own metric (`ANSWER_METRICS`)."""
    if family == "ruler_niah":
        hit = int(max_over_golds(string_match, prediction, golds))
        return {"em": hit, "f1": float(hit)}
    if family not in ANSWER_METRICS:
        raise KeyError(f"no answer metric for family {family!r}; known: {', '.join(ANSWER_METRICS)}")
    f1 = hotpot_f1 if family == "hotpotqa_group" else f1_score
    return {"em": int(max_over_golds(exact_match, prediction, golds)), "f1": max_over_golds(f1, prediction, golds)}


def max_over_golds(metric: Callable[[str, str], float], prediction: str, golds: Sequence[str]) -> float:
    """The best score of `prediction` against any of the gold answers (at least one)."""
    if not golds:
        raise ValueError("at least one gold answer is needed")
    return max(metric(prediction, g) for g in golds)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% for z = 1.96), as fractions in [0, 1]."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError("successes must be in [0, n]")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(values: Sequence[float], resamples: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (seeded: the same input gives the same
    interval)."""
    if not values:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int(math.floor((1 - level) / 2 * (resamples - 1)))]
    hi = means[int(math.ceil((1 + level) / 2 * (resamples - 1)))]
    return (lo, hi)


def sign_test_p(a: int, b: int) -> float:
    """Exact two-sided sign-test p-value of `a` vs `b` discordant pairs (McNemar's exact test)."""
    n = a + b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_flips(base: Sequence[int], other: Sequence[int]) -> dict[str, float]:
    """Paired 0/1 outcomes of the same questions: `base` (e.g. uncompressed) vs `other`.

    Returns:
        right_to_wrong, wrong_to_right, both_right, both_wrong (counts) and `p` (sign test of the
        two flip counts).
    """
    if len(base) != len(other):
        raise ValueError("paired outcomes must have the same length")
    r2w = sum(1 for x, y in zip(base, other, strict=True) if x and not y)
    w2r = sum(1 for x, y in zip(base, other, strict=True) if y and not x)
    both = sum(1 for x, y in zip(base, other, strict=True) if x and y)
    return {"right_to_wrong": r2w, "wrong_to_right": w2r, "both_right": both,
            "both_wrong": len(base) - r2w - w2r - both, "p": sign_test_p(r2w, w2r)}
