# SPDX-License-Identifier: Apache-2.0
"""Head-level score files: round-trip, fingerprint checks, and combining calibration runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from kvzip_plugin.head_scores import (
    FORMAT,
    fingerprint,
    head_scores_from,
    load_head_scores,
    save_head_scores,
)
from kvzip_plugin.types import ScoreMap


def llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(num_hidden_layers=3, num_key_value_heads=2, hidden_size=64, num_attention_heads=4,
                  vocab_size=100)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def test_fingerprint_fields():
    assert fingerprint(llama_config()) == {
        "model_type": "llama",
        "num_hidden_layers": 3,
        "num_key_value_heads": 2,
        "hidden_size": 64,
        "vocab_size": 100,
    }


def test_save_load_round_trip(tmp_path: Path):
    config = llama_config()
    scores = torch.rand((3, 2), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "heads.json"
    save_head_scores(path, scores, config, name="tiny-llama", calibration="unit test")
    loaded = load_head_scores(config, path)
    assert loaded.dtype == torch.float32
    assert loaded.shape == (3, 2)
    assert torch.equal(loaded, scores)
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT
    assert doc["model"] == "tiny-llama"
    assert doc["calibration"] == "unit test"
    assert doc["fingerprint"] == fingerprint(config)


@pytest.mark.parametrize(
    "other",
    [
        dict(vocab_size=101),
        dict(num_hidden_layers=4),
        dict(num_key_value_heads=4),
        dict(hidden_size=128),
    ],
)
def test_different_fingerprint_raises(tmp_path: Path, other):
    path = tmp_path / "heads.json"
    save_head_scores(path, torch.rand(3, 2), llama_config(), name="tiny", calibration="x")
    with pytest.raises(ValueError):
        load_head_scores(llama_config(**other), path)


def test_wrong_format_raises(tmp_path: Path):
    config = llama_config()
    path = tmp_path / "heads.json"
    save_head_scores(path, torch.rand(3, 2), config, name="tiny", calibration="x")
    doc = json.loads(path.read_text())
    doc["format"] = "something-else/1"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError):
        load_head_scores(config, path)


def test_no_shipped_file_for_unknown_architecture():
    # no shipped file matches a llama with a 12347-token vocabulary and 3 layers of width 64
    with pytest.raises(FileNotFoundError):
        load_head_scores(llama_config(vocab_size=12347), None)
    with pytest.raises(FileNotFoundError):
        load_head_scores(llama_config(vocab_size=12347))


def test_head_scores_from_max_over_positions_then_runs():
    gen = torch.Generator().manual_seed(1)
    layers, heads = 3, 2
    runs = [torch.rand((layers, heads, n), generator=gen) for n in (7, 11, 5)]
    maps = [ScoreMap(scores=s, scored_layers=(0, 1, 2)) for s in runs]
    got = head_scores_from(maps)
    assert got.shape == (layers, heads)
    for layer in range(layers):
        for head in range(heads):
            expected = max(max(float(x) for x in run[layer, head]) for run in runs)
            assert float(got[layer, head]) == pytest.approx(expected, abs=0)


def test_head_scores_from_single_run_and_not_mean():
    scores = torch.zeros(1, 2, 4)
    scores[0, 0] = torch.tensor([0.1, 0.9, 0.2, 0.3])
    scores[0, 1] = torch.tensor([0.5, 0.5, 0.5, 0.5])
    got = head_scores_from([ScoreMap(scores=scores, scored_layers=(0,))])
    assert got.tolist() == [[pytest.approx(0.9), pytest.approx(0.5)]]
    other = torch.zeros(1, 2, 3)
    other[0, 1, 2] = 0.8
    got2 = head_scores_from([ScoreMap(scores=scores, scored_layers=(0,)), ScoreMap(scores=other, scored_layers=(0,))])
    assert got2.tolist() == [[pytest.approx(0.9), pytest.approx(0.8)]]


def test_head_scores_from_empty_raises():
    with pytest.raises(ValueError):
        head_scores_from([])


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_head_level_scores_make_pair_selection_keep_whole_heads(ratio):
    """What the engines serve for `kvzip_head`: `select_runs(..., "pair")` over these scores keeps the
    head-level plan's whole heads (ratios that fall on whole heads), and the boundary head's most recent
    tokens otherwise."""
    from kvzip_plugin.eviction import plan_head_level
    from kvzip_plugin.head_scores import head_level_scores
    from kvzip_plugin.store import select_runs

    g = torch.Generator().manual_seed(3)
    heads = torch.rand(4, 2, generator=g)
    heads[1, 0] = heads[2, 1] + 1e-9  # nearly tied heads stay in order
    keep = select_runs(head_level_scores(heads, 40), 2, ratio, "pair", 1)
    assert bool(keep[..., :2].all())  # protected
    want = plan_head_level(heads, 40, ratio, tuple(range(4))).keep
    assert torch.equal(keep[..., 2:], want)
    partial = select_runs(head_level_scores(heads, 40), 0, 0.3, "pair", 1)  # 2.4 heads: the next one in part
    counts = sorted(partial.sum(-1).flatten().tolist())
    assert counts[-2:] == [40, 40] and counts[-3] == 16 and bool(partial.flatten(0, 1)[partial.sum(-1).flatten()
                                                                                       == 16][0, -16:].all())
