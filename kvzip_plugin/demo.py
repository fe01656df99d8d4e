# SPDX-License-Identifier: Apache-2.0
"""The offline demo: compress one long context once, answer several questions from it.

The context is a seeded, synthetic staff directory (badge numbers, offices, projects) wrapped in
filler prose, so answers can be checked exactly and the demo needs no download.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvzip_plugin.hf.compressor import CompressedContext, KVzipCompressor
from kvzip_plugin.hf.generate import Answer

_FIRST = ("Alice Bruno Chen Dana Elif Farid Greta Hiro Ines Jonas Kofi Lena Mateo Nadia Omar Priya Quinn "
          "Rosa Sven Tara Ugo Vera Wes Xena Yuki Zane").split()
_LAST = "Adler Brandt Costa Duval Engel Fischer Gomez Haas Ito Jensen Kovac Lund".split()
_CITIES = "Lisbon Oslo Nairobi Lima Osaka Quebec Tunis Perth Riga Hanoi Cusco Dakar".split()


@dataclass(frozen=True)
class DemoItem:
    """A question and the exact string its answer must contain."""

    question: str
    answer: str


def demo_context(n_people: int = 20, n_asked: int = 4, seed: int = 0) -> tuple[str, list[DemoItem]]:
    """A staff directory of `n_people` lines (about 20 tokens each) and two questions (badge
    number, city) about each of `n_asked` of them."""
    names = [f for f in _FIRST] + [f"{f} {last}" for last in _LAST for f in _FIRST]
    if not 1 <= n_people <= len(names):
        raise ValueError(f"n_people must be in [1, {len(names)}], got {n_people}")
    rng = random.Random(seed)
    people = names[:n_people]
    facts = {p: (rng.randint(1000, 9999), rng.choice(_CITIES)) for p in people}
    lines = ["Staff directory:"]
    lines += [f"{p} works in {city}. {p}'s badge number is {badge}." for p, (badge, city) in facts.items()]
    items = []
    for p in rng.sample(people, min(n_asked, n_people)):
        badge, city = facts[p]
        items.append(DemoItem(f"What is {p}'s badge number?", str(badge)))
        items.append(DemoItem(f"In which city does {p} work?", city))
    return "\n".join(lines), items


@dataclass(frozen=True)
class DemoRow:
    item: DemoItem
    full: Answer
    compressed: Answer


def run_demo(compressor: KVzipCompressor, context: str, items: list[DemoItem],
             max_new_tokens: int = 16) -> tuple[CompressedContext, CompressedContext, list[DemoRow]]:
    """Compress once, then answer every item from the full and from the compressed cache."""
    full = compressor.full(context)
    compressed = compressor.compress(context, progress=True)
    rows = [DemoRow(item, compressor.answer(full, item.question, max_new_tokens),
                    compressor.answer(compressed, item.question, max_new_tokens)) for item in items]
    return full, compressed, rows
