# SPDX-License-Identifier: Apache-2.0
"""The benchmark data sets: deterministic, pinned by checksum, answers findable in their context."""

from __future__ import annotations

import json
import re

import pytest

from kvzip_plugin import datasets


@pytest.mark.parametrize("name", datasets.names())
def test_named_sets_are_deterministic_and_match_their_pinned_checksum(name):
    a, b = datasets.generate(name), datasets.generate(name)
    assert a.to_json() == b.to_json()
    assert a.sha256 == b.sha256 == datasets.CHECKSUMS[name]
    assert datasets.load(name).sha256 == datasets.CHECKSUMS[name]
    d = a.describe()
    assert d["version"] == datasets.VERSION and d["sha256"] == a.sha256 and d["n_questions"] == a.n_questions


def test_every_named_set_is_pinned():
    assert set(datasets.CHECKSUMS) == set(datasets.names())


def test_load_rejects_a_changed_generator(monkeypatch):
    monkeypatch.setitem(datasets.CHECKSUMS, "kv-300", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        datasets.load("kv-300")
    assert datasets.load("kv-300", verify=False).name == "kv-300"


def test_unknown_set():
    with pytest.raises(KeyError, match="unknown data set"):
        datasets.load("nope")


def test_seed_changes_the_data():
    assert datasets.kv_retrieval(2, 10, 4, seed=0).sha256 != datasets.kv_retrieval(2, 10, 4, seed=1).sha256
    assert datasets.needles_in_filler(2, 10, 3, seed=0).sha256 != datasets.needles_in_filler(2, 10, 3, seed=1).sha256


def test_checksum_covers_the_canonical_json():
    data = datasets.kv_retrieval(1, 5, 2, seed=3)
    doc = json.loads(data.to_json())
    assert doc["params"] == {"n_samples": 1, "n_pairs": 5, "n_questions": 2, "seed": 3}
    assert doc["samples"][0]["items"][0]["answer"] == data.samples[0].items[0].answer


def test_kv_answers_are_unique_facts_of_the_context():
    data = datasets.kv_retrieval(3, 12, 6, seed=0)
    assert data.family == "kv" and len(data.samples) == 3 and data.n_questions == 18
    for sample in data.samples:
        lines = sample.context.split("\n")[1:]
        assert len(lines) == 12
        values = [re.search(r" is (\d{4})\.$", ln).group(1) for ln in lines]
        assert len(set(values)) == 12  # distinct values: one answer names one key
        questions = [it.question for it in sample.items]
        assert len(set(questions)) == len(questions) == 6
        for it in sample.items:
            key = it.answer_prefix.removeprefix("The secret code of ").removesuffix(" is")
            assert f"The secret code of {key} is {it.answer}." in lines
            assert key in it.question


def test_needles_are_spread_and_all_asked():
    data = datasets.needles_in_filler(4, 30, 5, seed=2, digits=6)
    for sample in data.samples:
        sentences = re.split(r"(?<=\.) ", sample.context)
        assert len(sentences) == 35
        needle_at = [i for i, s in enumerate(sentences) if s.startswith("The special magic number for")]
        assert len(needle_at) == 5
        # needle j sits in the j-th of five bands of the 31 insertion points
        for j, idx in enumerate(needle_at):
            filler_before = idx - j
            assert j * 31 // 5 <= filler_before < max(j * 31 // 5 + 1, (j + 1) * 31 // 5)
        assert len(sample.items) == 5
        for it in sample.items:
            assert len(it.answer) == 6 and it.answer.isdigit()
            assert sample.context.count(f"{it.answer_prefix} {it.answer}.") == 1


@pytest.mark.parametrize("kwargs", [dict(n_samples=0, n_pairs=3, n_questions=1, seed=0),
                                    dict(n_samples=1, n_pairs=0, n_questions=1, seed=0)])
def test_kv_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError):
        datasets.kv_retrieval(**kwargs)


def test_needles_reject_bad_sizes():
    with pytest.raises(ValueError):
        datasets.needles_in_filler(1, n_filler=2, n_needles=3, seed=0)


def test_squad_loader_is_seeded_and_skips_unanswerable(tmp_path):
    paras = []
    for p in range(4):
        qas = [{"id": f"{p}-{i}", "question": f"Q{p}.{i}?", "is_impossible": i == 0,
                "answers": [] if i == 0 else [{"text": f"A{p}.{i}", "answer_start": 0}]} for i in range(4)]
        paras.append({"context": f"Paragraph {p}.", "qas": qas})
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": paras}]}))
    a = datasets.squad_from_json(path, n_samples=2, n_questions=3, seed=0)
    b = datasets.squad_from_json(path, n_samples=2, n_questions=3, seed=0)
    assert a.sha256 == b.sha256 and a.family == "squad" and len(a.samples) == 2
    for sample in a.samples:
        assert all(not it.question.endswith(".0?") for it in sample.items)  # the unanswerable one
        assert all(it.answer.startswith("A") for it in sample.items)
    assert datasets.squad_from_json(path, n_samples=4, n_questions=4, seed=0).samples == ()  # only 3 answerable
