# SPDX-License-Identifier: Apache-2.0
"""Runs the Triton kernel tests in Triton's CPU interpreter when there is no GPU.

`TRITON_INTERPRET=1` must be set before triton is first imported, and this test session imports it
early (through torch._dynamo), so `test_run_attention_triton.py` skips itself here; this test runs
it in a fresh interpreter process with the variable set, and fails if any of its tests fails or skips.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel tests run on it directly")
def test_triton_kernels_in_the_interpreter():
    module = Path(__file__).with_name("test_run_attention_triton.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(module)],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                          timeout=600)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = re.search(r"(\d+) passed", proc.stdout)
    assert summary and int(summary.group(1)) >= 20 and "skipped" not in proc.stdout.splitlines()[-1], tail
