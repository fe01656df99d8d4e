# SPDX-License-Identifier: Apache-2.0
"""The `--kv-compression*` settings shared by the engine integrations (no engine needed)."""

from __future__ import annotations

import pytest

from kvzip_plugin.settings import (
    ENV_MIN_HITS,
    ENV_MODE,
    ENV_RATIO,
    KVCompressionSettings,
    make_settings,
    settings_from_env,
)


def test_valid_settings_and_round_trip():
    s = make_settings("0.25", 512, "3")
    assert s == KVCompressionSettings(ratio=0.25, min_prefix_tokens=512, min_hits=3)
    assert KVCompressionSettings.from_dict(s.to_extra_config()) == s
    assert make_settings().to_extra_config() == {}


@pytest.mark.parametrize(("kwargs", "field"), [({"ratio": 0}, "ratio"), ({"ratio": 1.5}, "ratio"),
                                               ({"min_prefix_tokens": 0}, "min_prefix_tokens"),
                                               ({"min_hits": "x"}, "min_hits")])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_settings(**kwargs)


def test_structure():
    assert make_settings(structure="Layer_Budget").structure == "layer_budget"
    s = make_settings(0.3, structure="pair")
    assert KVCompressionSettings.from_dict(s.to_dict()) == s and s.to_dict() == {"ratio": 0.3, "structure": "pair"}
    with pytest.raises(ValueError, match="structure: invalid choice 'layer'"):
        make_settings(structure="layer")  # the core's 'layer' (same tokens per layer) is not served
    env = {"KVZIP_KV_COMPRESSION": "kvzip", "KVZIP_KV_COMPRESSION_STRUCTURE": "head"}
    assert settings_from_env(env) == KVCompressionSettings(structure="head")
    with pytest.raises(ValueError, match="KVZIP_KV_COMPRESSION_STRUCTURE: structure: invalid choice"):
        settings_from_env({**env, "KVZIP_KV_COMPRESSION_STRUCTURE": "pairs"})


def test_environment():
    assert settings_from_env({}) is None and settings_from_env({"KVZIP_KV_COMPRESSION": "none"}) is None
    s = settings_from_env({"KVZIP_KV_COMPRESSION": "KVzip", "KVZIP_KV_COMPRESSION_RATIO": "0.5"})
    assert s == KVCompressionSettings(ratio=0.5)
    with pytest.raises(ValueError, match="KVZIP_KV_COMPRESSION_MIN_HITS"):
        settings_from_env({"KVZIP_KV_COMPRESSION": "kvzip", "KVZIP_KV_COMPRESSION_MIN_HITS": "0"})
    with pytest.raises(ValueError, match="invalid choice"):
        settings_from_env({"KVZIP_KV_COMPRESSION": "zip"})
    # (formerly in both engines' test_cli.py: the engines re-export these names)
    s = settings_from_env({ENV_MODE: "KVZIP", ENV_RATIO: "0.4", ENV_MIN_HITS: "2"})
    assert (s.ratio, s.min_prefix_tokens, s.min_hits) == (0.4, None, 2)
    with pytest.raises(ValueError, match=ENV_RATIO):
        settings_from_env({ENV_MODE: "kvzip", ENV_RATIO: "2"})
    with pytest.raises(ValueError, match=ENV_MODE):
        settings_from_env({ENV_MODE: "yes"})


def test_scorer_and_head_scores(tmp_path):
    import argparse
    import logging

    from kvzip_plugin.settings import add_kv_compression_args, settings_from_args

    path = tmp_path / "heads.json"
    path.write_text("{}")
    s = make_settings(scorer="KVZIP_HEAD", head_scores=str(path))
    assert (s.scorer, s.head_scores) == ("kvzip_head", str(path))
    assert KVCompressionSettings.from_dict(s.to_dict()) == s  # what the engines pass to their processes
    with pytest.raises(ValueError, match="scorer: invalid choice"):
        make_settings(scorer="snapkv")
    with pytest.raises(ValueError, match="needs structure 'pair'"):
        make_settings(scorer="kvzip_head", structure="head")
    with pytest.raises(ValueError, match="head_scores: no such file"):
        make_settings(scorer="kvzip_head", head_scores=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="only read by the scorer 'kvzip_head'"):
        make_settings(head_scores=str(path))
    env = {ENV_MODE: "kvzip", "KVZIP_KV_COMPRESSION_SCORER": "kvzip_head", "KVZIP_KV_COMPRESSION_STRUCTURE": "head"}
    with pytest.raises(ValueError, match="^KVZIP_KV_COMPRESSION_SCORER: scorer: 'kvzip_head'"):
        settings_from_env(env)
    parser = add_kv_compression_args(argparse.ArgumentParser(), mode_help="", env_applies="")
    args = parser.parse_args(["--kv-compression", "kvzip", "--kv-compression-scorer", "kvzip_head",
                              "--kv-compression-head-scores", str(path)])
    mode, got = settings_from_args(args, logging.getLogger("test"))
    assert mode == "kvzip" and got.scorer == "kvzip_head" and got.head_scores == str(path)
    args = parser.parse_args(["--kv-compression", "kvzip", "--kv-compression-scorer", "kvzip_head",
                              "--kv-compression-structure", "layer_budget"])
    with pytest.raises(ValueError, match="^--kv-compression-scorer: scorer"):
        settings_from_args(args, logging.getLogger("test"))


def test_scoring_step_tokens():
    import argparse
    import logging

    from kvzip_plugin.settings import add_kv_compression_args, settings_from_args

    s = make_settings(scoring_step_tokens="128")
    assert s.scoring_step_tokens == 128 and KVCompressionSettings.from_dict(s.to_dict()) == s
    assert make_settings(scoring_step_tokens=0).scoring_step_tokens == 0  # slicing off
    with pytest.raises(ValueError, match="step_tokens"):
        make_settings(scoring_step_tokens=-1)
    env = {"KVZIP_KV_COMPRESSION": "kvzip", "KVZIP_KV_COMPRESSION_SCORING_STEP_TOKENS": "64"}
    assert settings_from_env(env) == KVCompressionSettings(scoring_step_tokens=64)
    with pytest.raises(ValueError, match="KVZIP_KV_COMPRESSION_SCORING_STEP_TOKENS"):
        settings_from_env({**env, "KVZIP_KV_COMPRESSION_SCORING_STEP_TOKENS": "lots"})
    parser = add_kv_compression_args(argparse.ArgumentParser(), mode_help="", env_applies="")
    args = parser.parse_args(["--kv-compression", "kvzip", "--kv-compression-scoring-step-tokens", "512"])
    assert settings_from_args(args, logging.getLogger("t"))[1].scoring_step_tokens == 512
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-compression-scoring-step-tokens", "-5"])


def test_scoring_max_slowdown():
    """The slowdown a job may cause running requests: > 1 and finite; it reaches the scoring budget."""
    import argparse
    import logging

    from kvzip_plugin.settings import add_kv_compression_args, settings_from_args

    s = make_settings(scoring_max_slowdown="1.5", scoring_step_tokens=64)
    assert s.scoring_max_slowdown == 1.5 and KVCompressionSettings.from_dict(s.to_dict()) == s
    assert s.scoring_budget().target_slowdown == 1.5 and s.scoring_budget().step_tokens == 64
    assert make_settings().scoring_budget().target_slowdown == 1.2  # unset: the budget's default
    for bad in (1.0, 0.5, "nan", "inf", "fast"):
        with pytest.raises(ValueError, match="target_slowdown"):
            make_settings(scoring_max_slowdown=bad)
    env = {"KVZIP_KV_COMPRESSION": "kvzip", "KVZIP_KV_COMPRESSION_SCORING_MAX_SLOWDOWN": "2"}
    assert settings_from_env(env) == KVCompressionSettings(scoring_max_slowdown=2.0)
    with pytest.raises(ValueError, match="KVZIP_KV_COMPRESSION_SCORING_MAX_SLOWDOWN"):
        settings_from_env({**env, "KVZIP_KV_COMPRESSION_SCORING_MAX_SLOWDOWN": "1"})
    parser = add_kv_compression_args(argparse.ArgumentParser(), mode_help="", env_applies="")
    args = parser.parse_args(["--kv-compression", "kvzip", "--kv-compression-scoring-max-slowdown", "1.1"])
    assert settings_from_args(args, logging.getLogger("t"))[1].scoring_max_slowdown == 1.1
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-compression-scoring-max-slowdown", "0.9"])


def test_displace_factor():
    """How much hotter a job's prefix must be to displace a compacted one: finite and >= 0; it reaches the
    retention meter (0: never kept, the engine's LRU order)."""
    import argparse
    import logging

    from kvzip_plugin.retention import DISPLACE_FACTOR
    from kvzip_plugin.settings import add_kv_compression_args, settings_from_args

    s = make_settings(displace_factor="3")
    assert s.displace_factor == 3.0 and KVCompressionSettings.from_dict(s.to_dict()) == s
    assert s.hit_meter().displace_factor == 3.0
    assert make_settings().hit_meter().displace_factor == DISPLACE_FACTOR  # unset: the default
    meter = make_settings(displace_factor=0).hit_meter()
    meter.hit("old", 0.0, n=100)
    meter.hit("new", 0.0)
    assert not meter.keeps("old", "new", 0.0)  # 0: any compacted prefix is room
    for bad in (-1, "nan", "inf", "often"):
        with pytest.raises(ValueError, match="displace_factor"):
            make_settings(displace_factor=bad)
    env = {"KVZIP_KV_COMPRESSION": "kvzip", "KVZIP_KV_COMPRESSION_DISPLACE_FACTOR": "0"}
    assert settings_from_env(env) == KVCompressionSettings(displace_factor=0.0)
    with pytest.raises(ValueError, match="KVZIP_KV_COMPRESSION_DISPLACE_FACTOR"):
        settings_from_env({**env, "KVZIP_KV_COMPRESSION_DISPLACE_FACTOR": "-2"})
    parser = add_kv_compression_args(argparse.ArgumentParser(), mode_help="", env_applies="")
    args = parser.parse_args(["--kv-compression", "kvzip", "--kv-compression-displace-factor", "1.5"])
    assert settings_from_args(args, logging.getLogger("t"))[1].displace_factor == 1.5
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-compression-displace-factor", "-0.5"])
