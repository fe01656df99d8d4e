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
