# SPDX-License-Identifier: Apache-2.0
"""The offline demo: compress one long context once, answer several questions from it.

The context is a seeded, synthetic staff directory (badge numbers, offices, projects) wrapped in
filler prose, so answers can be checked exactly and the demo needs no download.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvzip_plugin.config import KVzipConfig
from kvzip_plugin.hf.compressor import CompressedContext, KVzipCompressor
from kvzip_plugin.hf.generate import Answer

_FIRST = ("Alice Bruno Chen Dana Elif Farid Greta Hiro Ines Jonas Kofi Lena Mateo Nadia Omar Priya Quinn "
          "Rosa Sven Tara Ugo Vera Wes Xena Yuki Zane").split()
_CITIES = "Lisbon Oslo Nairobi Lima Osaka Quebec Tunis Perth Riga Hanoi Cusco Dakar".split()
_PROJECTS = "Aurora Basalt Cobalt Dynamo Ember Falcon Glacier Harbor Iris Juniper".split()
_FILLER = (
    "The company was founded to build tools for careful record keeping, and every office keeps a "
    "printed copy of this directory next to the reception desk. Staff are asked to report changes "
    "to the operations team within a week, and the directory is reissued at the start of each quarter."
)


@dataclass(frozen=True)
class DemoItem:
    """A question and the exact string its answer must contain."""

    question: str
    answer: str


def demo_context(n_people: int = 24, seed: int = 0) -> tuple[str, list[DemoItem]]:
    """A directory of `n_people` staff and one question per fact kind about several of them."""
    if not 1 <= n_people <= len(_FIRST):
        raise ValueError(f"n_people must be in [1, {len(_FIRST)}], got {n_people}")
    rng = random.Random(seed)
    people = _FIRST[:n_people]
    facts = {p: (rng.randint(1000, 9999), rng.choice(_CITIES), rng.choice(_PROJECTS)) for p in people}
    lines = ["Staff directory.", _FILLER]
    for i, p in enumerate(people):
        badge, city, project = facts[p]
        lines.append(f"{p} works in the {city} office on project {project}. {p}'s badge number is {badge}.")
        if i % 6 == 5:
            lines.append(_FILLER)
    items = []
    for p in rng.sample(people, min(4, n_people)):
        badge, city, project = facts[p]
        items.append(DemoItem(f"What is {p}'s badge number? Answer with the number only.", str(badge)))
        items.append(DemoItem(f"Which office does {p} work in? Answer with the city only.", city))
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


def default_demo_config(ratio: float, structure: str) -> KVzipConfig:
    return KVzipConfig(ratio=ratio, structure=structure)  # type: ignore[arg-type]
