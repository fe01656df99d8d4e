# SPDX-License-Identifier: Apache-2.0
"""The SGLang test harness: where the CPU shims live, how this pytest process imports SGLang, and the real
SGLang HTTP server (`python -m sglang.launch_server --device cpu --attention-backend torch_native`) run
as a subprocess.

SGLang 0.5.23 has no CPU wheel: scripts/setup_sglang.sh installs it with its pure-Python dependencies and
puts torchvision in `$VENV/sglang-cpu-extras` (outside site-packages). Two test-only shims (shims/) make
it start on a CPU; nothing of SGLang's scheduler, caches, pools, attention or server is replaced:

* `shims/torchvision_ops.py`: the `torchvision::nms`/`qnms` schemas (PyPI torchvision is a CUDA build);
* `shims/sgl_kernel/`: pure-torch stand-ins for the `sgl_kernel` CPU ops SGLang imports at start-up.

Server subprocesses get `shims/` and the extras folder on PYTHONPATH (`shims/sitecustomize.py` defines the
schemas at interpreter start). This pytest process gets only the schemas and the extras folder (appended
to sys.path, after transformers was imported by tests/conftest.py, so transformers keeps seeing no
torchvision): in-process tests never run a CPU engine, so the `sgl_kernel` stand-in stays out.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SHIMS = Path(__file__).resolve().parent / "shims"
EXTRAS = Path(os.environ.get("KVZIP_SGLANG_EXTRAS") or Path(sys.prefix) / "sglang-cpu-extras")

_prepared: list[bool] = []  # require_sglang() ran in this process


def sglang_missing_reason() -> str | None:
    """Why SGLang cannot be used here (None when it can)."""
    if importlib.util.find_spec("sglang") is None:
        return "sglang is not installed (scripts/setup_sglang.sh)"
    if not (EXTRAS / "torchvision").is_dir():
        return f"torchvision for SGLang not found in {EXTRAS} (scripts/setup_sglang.sh)"
    return None


def require_sglang() -> None:
    """Skip the calling test module unless SGLang is installed; make it importable in this process."""
    reason = sglang_missing_reason()
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)
    if not _prepared:
        spec = importlib.util.spec_from_file_location("kvzip_test_torchvision_ops", SHIMS / "torchvision_ops.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.define()
        sys.modules[spec.name] = module  # keeps its torch.library.Library (and so the schemas) alive
        if str(EXTRAS) not in sys.path:
            sys.path.append(str(EXTRAS))
        _prepared.append(True)


def server_env(*, plugins: bool = True, **extra: str) -> dict[str, str]:
    """The environment of an SGLang subprocess: CPU engine, shims + extras on PYTHONPATH, offline, and no
    KVZIP_* variables from the caller. `plugins=False`: no general plugin is loaded (SGLANG_PLUGINS names
    none that exists), i.e. SGLang without kvzip-plugin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVZIP_")}
    env.update(
        SGLANG_USE_CPU_ENGINE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(SHIMS), str(EXTRAS), env.get("PYTHONPATH")) if p),
    )
    if not plugins:
        env["SGLANG_PLUGINS"] = "no-such-plugin"
    env.update(extra)
    return env


def launch_command(model_dir: Path | str, *args: str, port: int | None = None) -> list[str]:
    """`python -m sglang.launch_server` for the tiny model on this CPU. `--sleep-on-idle`: an idle SGLang
    scheduler otherwise spins a whole core (SGLang's own loop, with or without the plugin), which on the
    CI's 2 cores slows every test running beside a server kept for later tests."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--device", "cpu",
           "--attention-backend", "torch_native", "--disable-overlap-schedule", "--max-total-tokens", "2048",
           "--host", "127.0.0.1", "--sleep-on-idle"]
    if port is not None:
        cmd += ["--port", str(port)]
    return [*cmd, *args]


class _PortTaken(Exception):
    """The server's port was taken between `free_port()` and its bind."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SGLangServer:
    """A real SGLang HTTP server in its own process group; `stop()` ends that group (and only it)."""

    def __init__(self, model_dir: Path | str, *args: str, log_path: Path, plugins: bool = True,
                 env: dict[str, str] | None = None, startup_timeout: float = 420.0) -> None:
        self.log_path = Path(log_path)
        for attempt in range(3):  # a free port can be taken by another process before the server binds it
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
            self.proc = subprocess.Popen(
                launch_command(model_dir, *args, port=self.port), cwd=REPO,
                env=server_env(plugins=plugins, **(env or {})), stdout=self._log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                self._wait_ready(startup_timeout)
                return
            except _PortTaken:
                self.stop()
                if attempt == 2:
                    raise RuntimeError(f"SGLang server could not bind a port in 3 tries:\n{self.log[-3000:]}") from None
            except BaseException:
                self.stop()
                raise

    @property
    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SGLang server exited with {self.proc.returncode}:\n{self.log[-6000:]}")
            log = self.log
            if "The server is fired up and ready to roll!" in log:
                return
            if "address already in use" in log:  # uvicorn then waits for shutdown instead of exiting
                raise _PortTaken(self.port)
            time.sleep(1.0)
        raise TimeoutError(f"SGLang server not ready after {timeout:.0f} s:\n{self.log[-6000:]}")

    def post(self, path: str, payload: dict, timeout: float = 120.0) -> dict | list | None:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body.strip() else None

    def abort(self, rid: str | None = None, abort_all: bool = False) -> None:
        """SGLang's `/abort_request` (one request id, or every request with `abort_all`)."""
        self.post("/abort_request", {"rid": rid or "", "abort_all": abort_all})

    def metrics(self) -> dict[str, float]:
        """`/metrics` (`--enable-metrics`) as {"name{labels}": value}, comments dropped."""
        out = {}
        for line in self.get_text("/metrics").splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def settled_metrics(self, interval: float = 1.5, timeout: float = 20.0) -> dict[str, float]:
        """`metrics()` once the plugin's series stop moving: they are published at most once a second and at the
        scheduler's first idle step after work, which can come after the last HTTP reply. Two scrapes
        `interval` apart (longer than that second) with the same `kvzip_*` values, or the last one at `timeout`."""
        deadline = time.monotonic() + timeout
        last = self.metrics()
        while time.monotonic() < deadline:
            time.sleep(interval)
            now = self.metrics()
            if {k: v for k, v in now.items() if "kvzip_" in k} == {k: v for k, v in last.items() if "kvzip_" in k}:
                return now
            last = now
        return last

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the series of `name` whose labels include `labels` (0.0 if none)."""
        total = 0.0
        for key, value in self.metrics().items():
            base, _, rest = key.partition("{")
            if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += value
        return total

    def log_offset(self) -> int:
        return len(self.log)

    def get_text(self, path: str, timeout: float = 30.0) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return resp.read().decode()

    def generate(self, input_ids: list[int], max_new_tokens: int) -> dict:
        """Greedy generation from token ids; returns SGLang's response object."""
        out = self.post("/generate", {"input_ids": input_ids,
                                      "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens,
                                                          "ignore_eos": True}})
        return out[0] if isinstance(out, list) else out

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
        if not self._log.closed:
            self._log.close()


def run_launcher(*args: str, timeout: float = 300.0, **env: str) -> subprocess.CompletedProcess:
    """`python -m sglang.launch_server ARGS`, expected to exit by itself (start-up failures). On a
    timeout its whole process group is killed."""
    proc = subprocess.Popen([sys.executable, "-m", "sglang.launch_server", *args], cwd=REPO, env=server_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def cpu_pools(dtype, max_context_len: int, size: int = 64) -> tuple:
    """SGLang's real KV pool (`size` slots, page 1, 2 layers x 2 heads x dim 8), token allocator and request
    rows on the CPU, for in-process cache tests: `(kv_pool, allocator, req_to_token_pool)`."""
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    kv = MHATokenToKVPool(size=size, page_size=1, dtype=dtype, head_num=2, head_dim=8, layer_num=2, device="cpu",
                          enable_memory_saver=False)
    alloc = TokenToKVPoolAllocator(size, dtype, "cpu", kv, need_sort=False)
    req_to_token = ReqToTokenPool(size=4, max_context_len=max_context_len, device="cpu", enable_memory_saver=False)
    return kv, alloc, req_to_token
