# SPDX-License-Identifier: Apache-2.0
"""What every benchmark JSON records about the run: the git commit (dirty or not) and the CPU model."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def git_commit() -> str:
    """Short HEAD hash of this checkout, `+dirty` when files differ from it."""
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                         check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=HERE,
                           check=False).stdout.strip()
    return git + ("+dirty" if dirty else "")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the machine type elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        if names:
            return names[0]
    return platform.machine()
