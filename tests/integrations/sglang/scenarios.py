# SPDX-License-Identifier: Apache-2.0
"""Request sequences the SGLang end-to-end tests send to real servers (harness.SGLangServer). Not a test
module.

`SEQUENCE`: a 200-token shared prefix (random ids, no protected template opening) followed by six short
suffixes, one request at a time, greedy, 12 new tokens with their logprobs. With `--kv-compression kvzip`
and the trigger lowered to 64 tokens / 2 hits, the second request (r1) queues a job; its scoring request and
the compaction run while r1 decodes, and r2..r5 are served by the compacted prefix.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

# step 1's prompts (test_e2e_none): a 48-token shared prefix, below the 64-token trigger of the kvzip servers
STEP1_MAX_NEW = 12
STEP1_SHARED = [(7 * i + 3) % 300 + 20 for i in range(48)]
STEP1_PROMPTS = [
    STEP1_SHARED + [401, 402, 403, 404, 405],
    STEP1_SHARED + [411, 412, 413],  # hits the shared prefix
    STEP1_SHARED + [401, 402, 403, 404, 405],  # hits all but the last token
    [30 + i for i in range(20)],  # unrelated
]

PREFIX_LEN = 200
MAX_NEW = 12
SUFFIXES = ([11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36], [41, 42], [51, 52, 53], [61, 62])
KVZIP_TRIGGER = ("--kv-compression-min-prefix-tokens", "64", "--kv-compression-min-hits", "2")

_DECODE = re.compile(r"Decode batch, #running-req: (\d+), #token: (\d+)")


def prefix_ids(seed: int = 0, n: int = PREFIX_LEN) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50, 450) for _ in range(n)]


def generate(server, ids: list[int], max_new: int = MAX_NEW, logprobs: bool = True, rid: str | None = None,
             timeout: float = 300.0) -> dict:
    payload = {"input_ids": ids, "return_logprob": logprobs,
               "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new, "ignore_eos": True}}
    if rid is not None:
        payload["rid"] = rid
    out = server.post("/generate", payload, timeout=timeout)
    return out[0] if isinstance(out, list) else out


def wait_for_log(server, pattern: str, timeout: float = 60.0, start: int = 0) -> re.Match | None:
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        found = regex.search(server.log, start)
        if found:
            return found
        time.sleep(0.2)
    return None


def wait_until(condition, timeout: float = 30.0, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def wait_jobs_ended(server, timeout: float = 60.0) -> None:
    """Wait until every job the log says was queued has ended (committed, failed or cancelled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.log
        queued = len(re.findall(r"kvzip-plugin: job \d+ queued", log))
        if len(re.findall(r"kvzip-plugin: job \d+ (?:committed|failed|cancelled)", log)) >= queued:
            return
        time.sleep(0.2)


def _request_segment(server, start: int, n_out: int, timeout: float = 10.0) -> str:
    """The server log since `start`, once it holds the request's whole decode record: with `--decode-log-interval
    1`, a `Decode batch` line per decode step (`n_out - 2` for `n_out` tokens) and the one logged after the request
    finished. The response can reach the client before that last line is written (on a busy 2-core host it then
    lands in the next request's segment, and this request loses a step: a CI failure). Without decode logging
    (no such line at all) the log is returned as it is."""
    deadline = time.monotonic() + timeout
    while True:
        segment = server.log[start:]
        n = len(_DECODE.findall(segment))
        if n == 0 or n >= n_out - 1 or time.monotonic() > deadline:
            return segment
        time.sleep(0.02)


def run_sequence(server, wait_job: bool = True, seed: int = 0, settle_each: bool = False) -> dict:
    """Send SEQUENCE one request at a time; after r1, wait (up to 60 s) for its job to end. `settle_each`: after
    every request, wait until no job is left (a job retried on a later hit then never shares a batch with
    the next request, whose outputs must then not depend on timing)."""
    prefix = prefix_ids(seed)
    results = []
    for i, sfx in enumerate(SUFFIXES):
        start = server.log_offset()
        out = generate(server, prefix + list(sfx))
        meta = out["meta_info"]
        segment = _request_segment(server, start, len(out["output_ids"]))
        results.append({
            "id": f"r{i}",
            "tokens": list(out["output_ids"]),
            "logprobs": [lp[0] for lp in meta["output_token_logprobs"]],
            "prompt_tokens": meta["prompt_tokens"],
            "cached_tokens": meta["cached_tokens"],
            # KV slots in use at each decode step while the request ran alone; the segment's last such line is
            # logged after it finished (0, or the slots a queued job pins)
            "decode_tokens": [int(m.group(2)) for m in list(_DECODE.finditer(segment))[:-1]
                              if m.group(1) == "1" and int(m.group(2)) > 0],
        })
        if i == 1 and wait_job:
            wait_for_log(server, r"kvzip-plugin: job \d+ (committed|failed|cancelled)")
        if settle_each:
            wait_jobs_ended(server)
    return {"prefix": prefix, "suffixes": [list(s) for s in SUFFIXES], "requests": results}


def state_seq(dump_dir: Path) -> int:
    """Number of the cache's last state dump (0 if none yet)."""
    path = Path(dump_dir) / "state.json"
    try:
        return int(json.loads(path.read_text())["seq"])
    except (OSError, ValueError, KeyError):
        return 0


def read_state(dump_dir: Path, timeout: float = 60.0, after: int = 0, settle: float = 1.0) -> dict:
    """The cache's state once the server has settled: `state.json` is written at the first idle step after
    any work (its metrics are published just before), so a dump numbered above `after`, fully idle and not
    replaced for `settle` seconds is the state after everything sent so far."""
    deadline = time.monotonic() + timeout
    path = Path(dump_dir) / "state.json"
    state, seen, since = None, None, time.monotonic()
    while time.monotonic() < deadline:
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            state = None
        if state is not None and state["seq"] != seen:
            seen, since = state["seq"], time.monotonic()
        elif state is not None and state["seq"] > after and state["fully_idle"] and time.monotonic() - since >= settle:
            return state
        time.sleep(0.1)
    raise TimeoutError(f"no settled state dump after #{after} in {dump_dir}: last {state}")


def state_after_jobs(dump_dir: Path, n_finished: int, timeout: float = 600.0) -> dict:
    """The cache's settled state (`read_state`) once `n_finished` jobs have ended (committed, failed or cancelled)
    and none is live; the last state read when `timeout` runs out first."""
    state = read_state(dump_dir, timeout=timeout)
    deadline = time.monotonic() + timeout
    while (state["jobs_live"] or sum(state["finished"].values()) < n_finished) and time.monotonic() < deadline:
        state = read_state(dump_dir, timeout=timeout, after=state["seq"])
    return state
