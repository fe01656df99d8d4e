# SPDX-License-Identifier: Apache-2.0
"""SQuAD answer scoring (cases worked through the official v1.1 / v2.0 evaluation script's rules) and
the paired statistics of the engine accuracy benchmark."""

from __future__ import annotations

import pytest

from kvzip_plugin.eval import metrics
from kvzip_plugin.eval.metrics import (
    bootstrap_interval,
    exact_match,
    f1_score,
    max_over_golds,
    normalize_answer,
    paired_flips,
    sign_test_p,
    wilson_interval,
)
from tests.helpers import load_benchmark


@pytest.mark.parametrize("text, expected", [
    ("The Quick, brown fox!", "quick brown fox"),
    ("an apple a day", "apple day"),
    ("  Theater\tand   THEN ", "theater and then"),  # articles only as whole words
    ("Newton's Universal Gravitation Constant,", "newtons universal gravitation constant"),
    ("U.S.A. (1776)", "usa 1776"),
    ("the", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_punctuation_and_articles():
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1
    assert exact_match("Eiffel Tower in Paris", "Eiffel Tower") == 0
    assert exact_match("", "the") == 1  # both normalise to ""


def test_f1_counts_shared_normalised_tokens():
    assert f1_score("Denver Broncos", "the Denver Broncos") == 1.0
    assert f1_score("the Denver", "Denver Broncos") == pytest.approx(2 / 3)  # precision 1, recall 1/2
    assert f1_score("x x y", "x y") == pytest.approx(0.8)  # the repeated token counts once: P 2/3, R 1
    assert f1_score("Carolina Panthers", "Denver Broncos") == 0.0
    assert f1_score("", "") == 1.0 and f1_score("a", "the") == 1.0  # both empty after normalising
    assert f1_score("Denver", "") == 0.0 and f1_score("", "Denver") == 0.0


def test_max_over_golds_takes_the_best_gold():
    golds = ["uncivilized", "uncivilized people", "fully human"]
    assert max_over_golds(exact_match, "Uncivilized people.", golds) == 1
    assert max_over_golds(f1_score, "human beings", golds) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        max_over_golds(f1_score, "x", [])


def test_hotpot_f1_zeroes_a_wrong_yes_or_no():
    assert metrics.hotpot_f1("yes", "no") == 0.0
    # a yes/no gold takes exactly yes/no (SQuAD's F1 would give these partial credit)
    assert metrics.hotpot_f1("yes it is", "yes") == 0.0 < metrics.f1_score("yes it is", "yes")
    assert metrics.hotpot_f1("no", "no man's land") == 0.0 < metrics.f1_score("no", "no man's land")
    assert metrics.hotpot_f1("No.", "no") == 1.0
    assert metrics.hotpot_f1("Paris, France", "Paris") == metrics.f1_score("Paris, France", "Paris")


def test_string_match_is_rulers():
    assert metrics.string_match("The number is 4131662.", "4131662") == 1
    assert metrics.string_match("It is 413166", "4131662") == 0
    assert metrics.string_match("AMBER-falcon", "amber-falcon") == 1


def test_score_text_uses_each_familys_metric():
    assert metrics.score_text("ruler_niah", "is 4131662.", ["4131662"]) == {"em": 1, "f1": 1.0}
    assert metrics.score_text("ruler_niah", "is 4131663.", ["4131662"]) == {"em": 0, "f1": 0.0}
    assert metrics.score_text("squad_group", "the Paris", ["Paris", "x"]) == {"em": 1, "f1": 1.0}
    assert metrics.score_text("hotpotqa_group", "yes", ["no"]) == {"em": 0, "f1": 0.0}
    assert metrics.score_text("hotpotqa_group", "Paris France", ["Paris"])["f1"] == pytest.approx(2 / 3)
    with pytest.raises(KeyError):
        metrics.score_text("kv", "a", ["a"])


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [0.0, 0.5, 1.0, 1.0, 0.0, 0.25, 0.75, 1.0]
    a, b = bootstrap_interval(values, seed=0), bootstrap_interval(values, seed=0)
    assert a == b
    mean = sum(values) / len(values)
    assert a[0] < mean < a[1] and 0.0 <= a[0] and a[1] <= 1.0
    assert bootstrap_interval([0.4] * 5) == (pytest.approx(0.4), pytest.approx(0.4))
    wide, narrow = bootstrap_interval(values), bootstrap_interval(values * 16)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_sign_test_and_paired_flips():
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(1, 1) == 1.0
    assert sign_test_p(0, 5) == pytest.approx(0.0625) and sign_test_p(6, 0) == pytest.approx(0.03125)
    flips = paired_flips([1, 1, 0, 0, 1, 0], [1, 0, 1, 0, 0, 0])
    assert flips["right_to_wrong"] == 2 and flips["wrong_to_right"] == 1
    assert flips["both_right"] == 1 and flips["both_wrong"] == 2 and flips["p"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        paired_flips([1], [1, 0])


# ---- the benchmark's answer cut and report (benchmarks/bench_engine_accuracy.py; no engine, no model) ----

def _bench():
    return load_benchmark("bench_engine_accuracy")


class _CharTokenizer:
    """One token per character (ids = code points); id 0 is the stop token."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


def test_cut_answer_stops_at_a_stop_token_or_a_newline():
    bench = _bench()
    tok = _CharTokenizer()
    ids = [ord(c) for c in " Paris\nmore"]
    kept, text = bench.cut_answer(tok, ids, [0])
    assert text == "Paris" and kept == ids[:7]  # the newline token is the last kept one
    kept, text = bench.cut_answer(tok, [ord("a"), ord("b"), 0, ord("c")], [0])
    assert text == "ab" and kept == [ord("a"), ord("b")]
    # an engine that decoded past the stop gives the same answer as a decoder that stopped there
    assert bench.cut_answer(tok, ids, [0]) == bench.cut_answer(tok, ids[:7], [0])


def test_parse_configs():
    bench = _bench()
    assert bench.parse_configs(["pair@0.3", "none", "head@0.5"], [], []) == [("none", 1.0), ("pair", 0.3),
                                                                            ("head", 0.5)]
    assert bench.parse_configs(None, ["pair"], [0.3, 0.5]) == [("none", 1.0), ("pair", 0.3), ("pair", 0.5)]
    with pytest.raises(ValueError):
        bench.parse_configs(["pair"], [], [])


def test_summary_pairs_questions_against_none_and_the_transformers_path():
    bench = _bench()
    rows = []
    # 4 questions; none: right, right, wrong, wrong; pair: right, wrong, right, wrong (on both paths)
    for path in ("vllm", "transformers"):
        for structure, ratio, em in (("none", 1.0, [1, 1, 0, 0]), ("pair", 0.3, [1, 0, 1, 0])):
            for q, e in enumerate(em):
                answer = f"a{q}{e}" if path == "vllm" or q != 3 else "other"
                rows.append({"path": path, "dataset": "d", "structure": structure, "ratio": ratio, "sample": "s",
                             "question": q, "correct": e, "em": e, "f1": float(e), "answer": answer})
    summary = {(r["engine"], r["structure"]): r for r in bench.summarize(rows)}
    pair = summary[("vllm", "pair")]
    assert pair["correct"] == 2 and pair["accuracy"] == 50.0 and pair["f1"] == 50.0
    assert pair["accuracy_ci95"][0] < 50.0 < pair["accuracy_ci95"][1]
    assert pair["vs_none"]["right_to_wrong"] == 1 and pair["vs_none"]["wrong_to_right"] == 1
    assert pair["vs_none"]["f1_delta"] == 0.0
    vs = pair["vs_transformers"]
    assert vs["same_correct"] == 4 and vs["same_answer"] == 3 and vs["engine_only"] == 0 and vs["n"] == 4
    assert "vs_none" not in summary[("vllm", "none")] and "vs_transformers" not in summary[("transformers", "pair")]
    md = bench.markdown({"meta": {"engine": "vllm"}, "summary": bench.summarize(rows)})
    assert "| d | pair | 0.3 | 50.0 [" in md and "1 / 1 (p 1.00)" in md and "4 / 3 (4)" in md
