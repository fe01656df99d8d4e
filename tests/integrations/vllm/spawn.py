# SPDX-License-Identifier: Apache-2.0
"""Run a scenario module of these tests in a fresh Python process and parse its `RESULT <json>` line.

Every engine configuration gets its own process, so the vLLM general-plugin state (loaded once per
process) and the environment are those of that configuration only. KVZIP_* variables of the calling
environment are dropped. Single-process scenarios are forked from a process that imported vLLM once
(`zygote.py`: 15-20 s less per scenario on the CI machine); the others start with `python -m`.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def _base_env(single_process: bool, plugins: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVZIP_")}
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB
        VLLM_ALLOW_INSECURE_SERIALIZATION="1",  # collective_rpc with a function (run_llm._worker_info)
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
    )
    if single_process:  # EngineCore and the worker in this process: ~30 s less start-up
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", KVZIP_TEST_EXECUTOR="uni")
    if not plugins:
        env["VLLM_PLUGINS"] = "no-such-plugin"
    return env


class _Zygote:
    """The parent's handle on `zygote.py`: one per test process, started on first use (single-process
    scenarios with plugins only: the others change what vLLM reads at import or start processes of
    their own). `KVZIP_TEST_ZYGOTE=0` in the calling environment turns it off (every scenario in a
    fresh `python -m`)."""

    _proc: subprocess.Popen | None = None
    _buf = b""

    @classmethod
    def usable(cls, single_process: bool, plugins: bool, extra: dict[str, str]) -> bool:
        """Only where the child differs from the zygote in KVZIP_* variables alone (the plugin reads them when
        the engine starts, in the child): others, e.g. TRITON_INTERPRET, are read by the imports."""
        return (single_process and plugins and all(k.startswith("KVZIP_") for k in extra)
                and os.environ.get("KVZIP_TEST_ZYGOTE", "1") == "1" and hasattr(os, "fork"))

    @classmethod
    def _line(cls, deadline: float) -> dict:
        assert cls._proc is not None and cls._proc.stdout is not None
        fd = cls._proc.stdout.fileno()
        while b"\n" not in cls._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("zygote: no answer in time")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"zygote exited (rc={cls._proc.wait()})")
            cls._buf += chunk
        line, cls._buf = cls._buf.split(b"\n", 1)
        return json.loads(line)

    @classmethod
    def _start(cls) -> None:
        cls._proc = subprocess.Popen([sys.executable, "-m", "tests.integrations.vllm.zygote"], cwd=REPO,
                                     env=_base_env(True, True), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0)
        cls._buf = b""
        atexit.unregister(cls._stop)  # one registration, however often the zygote is restarted
        atexit.register(cls._stop)
        assert cls._line(time.monotonic() + 300).get("ready")

    @classmethod
    def _stop(cls) -> None:
        if cls._proc is not None and cls._proc.poll() is None:
            cls._proc.stdin.close()
            try:
                cls._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                cls._proc.kill()
        cls._proc = None

    @classmethod
    def run(cls, module: str, args: tuple[str, ...], env: dict[str, str], timeout: float) -> tuple[int, str, str]:
        if cls._proc is None or cls._proc.poll() is not None:
            cls._start()
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            req = {"module": module, "args": list(args), "env": env, "cwd": str(REPO), "stdout": out, "stderr": err}
            cls._proc.stdin.write((json.dumps(req) + "\n").encode())
            deadline = time.monotonic() + timeout
            pid = cls._line(deadline)["pid"]
            try:
                rc = cls._line(deadline)["rc"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                cls._line(time.monotonic() + 30)
                raise subprocess.TimeoutExpired([module, *args], timeout) from None
            with open(out) as f_out, open(err) as f_err:
                return rc, f_out.read(), f_err.read()


def spawn(module: str, *args: str, single_process: bool, plugins: bool = True, **env_extra: str) -> dict:
    env = _base_env(single_process, plugins)
    env.update(env_extra)
    if _Zygote.usable(single_process, plugins, env_extra):
        rc, stdout, stderr = _Zygote.run(module, args, env, timeout=600)
    else:
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert rc == 0 and lines, f"rc={rc}\n{stdout[-3000:]}\n{stderr[-6000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    result["log"] = stdout + stderr
    return result
