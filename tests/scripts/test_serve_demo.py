# SPDX-License-Identifier: Apache-2.0
"""scripts/serve_demo.sh (the main job) refuses bad input before it starts anything."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", **env})


def test_unknown_engine_is_refused():
    res = _run("serve_demo.sh", "--engine", "tgi")
    assert res.returncode == 2 and "--engine must be vllm or sglang, not 'tgi'" in res.stderr


@pytest.mark.parametrize("script,engine,setup", [("vllm_demo.sh", "vllm", "setup_vllm.sh"),
                                                  ("sglang_demo.sh", "sglang", "setup_sglang.sh")])
def test_missing_engine_names_its_setup_script(tmp_path, script, engine, setup):
    res = _run(script, VENV=str(tmp_path / "no-venv"))
    assert res.returncode == 1
    assert f"{engine} is not installed in {tmp_path / 'no-venv'}; run: bash scripts/setup.sh && bash scripts/{setup}" \
        in res.stderr


def test_help_lists_both_engines():
    res = _run("serve_demo.sh", "--help")
    assert res.returncode == 0 and "--engine vllm" in res.stdout and "--engine sglang" in res.stdout
