# SPDX-License-Identifier: Apache-2.0
"""KVzipConfig: defaults validate, every invalid field raises a ValidationError naming it."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from kvzip_plugin.config import (
    DEFAULT_REPEAT_PROMPT_FIRST,
    DEFAULT_REPEAT_PROMPT_NEXT,
    KVzipConfig,
)


def test_defaults_are_valid():
    cfg = KVzipConfig()
    assert cfg.ratio == pytest.approx(0.3)
    assert cfg.structure == "pair"
    assert cfg.scorer == "kvzip"
    assert cfg.head_scores_path is None
    assert cfg.score_softmax == "chunk"
    assert cfg.chunk_size == 2000
    assert cfg.carry_tokens == 8
    assert cfg.repeat_prompt_first == DEFAULT_REPEAT_PROMPT_FIRST
    assert cfg.repeat_prompt_next == DEFAULT_REPEAT_PROMPT_NEXT
    assert cfg.system_prompt is None
    assert cfg.protected_prefix_tokens is None
    assert cfg.min_context_tokens == 16
    assert cfg.prefill_chunk_size == 16384
    assert cfg.score_query_block == 512
    # re-validating the dumped defaults gives an equal config
    assert KVzipConfig(**cfg.model_dump()) == cfg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ratio", 0),
        ("ratio", -0.1),
        ("ratio", 1.01),
        ("ratio", "abc"),
        ("structure", "foo"),
        ("scorer", "bar"),
        ("score_softmax", "x"),
        ("chunk_size", 0),
        ("carry_tokens", -1),
        ("repeat_prompt_first", "   "),
        ("repeat_prompt_next", ""),
        ("protected_prefix_tokens", -1),
        ("min_context_tokens", 0),
        ("prefill_chunk_size", 0),
        ("score_query_block", 0),
    ],
)
def test_invalid_value_names_field(field, value):
    with pytest.raises(pydantic.ValidationError) as exc_info:
        KVzipConfig(**{field: value})
    assert field in str(exc_info.value)
    # exactly this field is reported
    locs = [err["loc"] for err in exc_info.value.errors()]
    assert locs == [(field,)]


def test_validation_error_is_value_error():
    with pytest.raises(ValueError):
        KVzipConfig(ratio=0)


def test_missing_head_scores_file(tmp_path: Path):
    missing = tmp_path / "does_not_exist.json"
    with pytest.raises(pydantic.ValidationError) as exc_info:
        KVzipConfig(head_scores_path=missing)
    assert "head_scores_path" in str(exc_info.value)


def test_existing_head_scores_file_accepted(tmp_path: Path):
    path = tmp_path / "scores.json"
    path.write_text("{}")
    assert KVzipConfig(head_scores_path=path).head_scores_path == path
    # a directory is not a file
    with pytest.raises(pydantic.ValidationError, match="head_scores_path"):
        KVzipConfig(head_scores_path=tmp_path)


def test_unknown_field_forbidden():
    with pytest.raises(pydantic.ValidationError) as exc_info:
        KVzipConfig(no_such_option=1)
    assert "no_such_option" in str(exc_info.value)


def test_head_scorer_needs_pair_structure():
    with pytest.raises(pydantic.ValidationError) as exc_info:
        KVzipConfig(scorer="kvzip_head", structure="head")
    assert "structure" in str(exc_info.value)
    with pytest.raises(pydantic.ValidationError, match="structure"):
        KVzipConfig(scorer="kvzip_head", structure="layer")
    assert KVzipConfig(scorer="kvzip_head", structure="pair").scorer == "kvzip_head"


@pytest.mark.parametrize("structure", ["pair", "head", "layer"])
def test_kvzip_scorer_accepts_every_structure(structure):
    assert KVzipConfig(structure=structure).structure == structure


def test_ratio_one_accepted():
    assert KVzipConfig(ratio=1.0).ratio == 1.0


def test_boundary_values_accepted():
    cfg = KVzipConfig(chunk_size=1, carry_tokens=0, protected_prefix_tokens=0, min_context_tokens=1,
                      prefill_chunk_size=1, score_query_block=1, score_softmax="full_cache")
    assert (cfg.chunk_size, cfg.carry_tokens, cfg.protected_prefix_tokens) == (1, 0, 0)
    assert cfg.score_softmax == "full_cache"


def test_config_is_frozen():
    cfg = KVzipConfig()
    with pytest.raises(pydantic.ValidationError):
        cfg.ratio = 0.5  # type: ignore[misc]
    assert cfg.ratio == pytest.approx(0.3)
