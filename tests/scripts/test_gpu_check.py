# SPDX-License-Identifier: Apache-2.0
"""The GPU check (`benchmarks/gpu_check.py`, `scripts/gpu_check.sh`) runs its checks on CPU at tiny
shapes here, so the script a lent GPU runs is known to work; on a GPU the full check runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import load_benchmark

REPO = Path(__file__).resolve().parents[2]


def _gpu_check():
    return load_benchmark("gpu_check")


def test_quick_check_passes_on_cpu(tmp_path):
    out = tmp_path / "gpu-check.json"
    assert _gpu_check().main(["--device", "cpu", "--quick", "--repeats", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["ok"] and {c["name"] for c in doc["checks"]} == {"score_bf16", "store_kv4d"}
    assert doc["checks"][1]["max_abs_error"] < 1e-4 and doc["score_vs_prefill"][0]["score_ms"] > 0


def test_quick_check_needs_no_pydantic_or_engine():
    """The GPU machine has torch, triton and transformers only."""
    code = ("import sys, runpy; sys.modules['pydantic'] = None; sys.modules['vllm'] = None; "
            "sys.modules['sglang'] = None; sys.argv = ['gpu_check', '--device', 'cpu', '--quick', '--repeats', '1', "
            "'--out', sys.argv[1]]; runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code, "/dev/null"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "gpu_check: PASS" in res.stdout


def test_triton_check_passes_in_the_interpreter():
    """The GPU check's Triton comparison (head pages scattered over blocks, an empty run, bf16) under
    Triton's CPU interpreter (set before triton is imported, hence a subprocess)."""
    pytest.importorskip("triton")
    code = ("import importlib.util, json; spec = importlib.util.spec_from_file_location('gc', "
            "'benchmarks/gpu_check.py'); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(json.dumps(m.check_triton('cpu')))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["max_abs_error"] < 1e-4


_PREFIX_TINY = ["--device", "cpu", "--lengths", "256", "--batches", "1", "3", "--q-heads", "4", "--kv-heads", "2",
                "--head-dim", "16", "--page", "16", "--own", "20", "--repeats", "1"]


def test_prefix_attention_bench_runs_on_cpu(tmp_path):
    """`bench_prefix_attention.py`, the GPU check's second half, at tiny shapes: every configuration timed,
    the shared pass and the one-pass path agree (the script asserts it), the path that read the runs named."""
    out = tmp_path / "prefix.json"
    load_benchmark("bench_prefix_attention").main([*_PREFIX_TINY, "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["L"], r["batch"]) for r in rows] == [(256, 1), (256, 3)]
    for r in rows:
        assert r["runs_shared_path"] == "torch" and "runs_triton_prefix_only_ms" not in r
        assert all(r[k] > 0 for k in ("full_per_request_ms", "head_per_request_ms", "runs_shared_ms",
                                      "runs_one_pass_ms"))
        assert 0.2 < r["kept_fraction"] < 0.4


def test_prefix_attention_bench_triton_branch_in_the_interpreter(tmp_path):
    """The branch a GPU runs (`runs/triton`: the kernel's output checked against torch over the kept pairs,
    then timed), here under Triton's CPU interpreter, so the GPU run cannot fail on the script itself."""
    pytest.importorskip("triton")
    out = tmp_path / "prefix.json"
    res = subprocess.run([sys.executable, "benchmarks/bench_prefix_attention.py", *_PREFIX_TINY, "--triton",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["runs_triton_prefix_only_ms"] > 0 for r in rows)
    assert "runs/triton |" in out.with_suffix(".md").read_text()


def test_script_refuses_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert res.returncode == 1 and "no CUDA device visible" in res.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_full_check_on_the_gpu(tmp_path):
    assert _gpu_check().main(["--out", str(tmp_path / "gpu-check.json")]) == 0
