# SPDX-License-Identifier: Apache-2.0
"""Bad requests a hostile or careless client sends to an SGLang server (issue 16: the hostile probe on SGLang).

`probe` sends each one, in order, and records what the server answered (HTTP status, and the start of an
error body); the end-to-end modules send the same list to the server without the plugin and to the
`--kv-compression kvzip` server, and require the same answers, a live server afterwards, and (where the
module checks it) the pool back to its idle accounting. Requests that reach a compacted prefix carry its
tokens, so the plugin's adoption path sees them too.

Not sent, because SGLang 0.5.23 itself does not check them and its scheduler dies on the first one, with or
without the plugin (found by this probe on CPU: "Scheduler hit an exception", connection closed, server gone):
token ids outside the vocabulary (past its end, or negative), and `top_logprobs_num` larger than the
vocabulary.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def _send(url: str, path: str, body: bytes, timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, text = resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return {"status": err.code, "body": err.read().decode(errors="replace")[:300]}
    out: dict[str, Any] = {"status": status, "body": text[:300]}
    try:
        got = json.loads(text)
    except ValueError:
        return out
    got = got[0] if isinstance(got, list) and got else got
    if isinstance(got, dict) and "output_ids" in got:  # a /generate answer: what the tests compare
        meta = got.get("meta_info", {})
        out.update(output_ids=got["output_ids"], cached_tokens=meta.get("cached_tokens"),
                   input_logprobs=len(meta.get("input_token_logprobs") or []))
    return out


def battery(prefix: list[int], context_len: int) -> list[tuple[str, str, bytes]]:
    """(name, path, raw body) of every bad request; `prefix` is a shared prefix the server may hold compacted."""
    greedy = {"temperature": 0.0, "max_new_tokens": 4}

    def gen(**kw: Any) -> bytes:
        return json.dumps(kw).encode()

    return [
        ("generate: empty input_ids", "/generate", gen(input_ids=[], sampling_params=greedy)),
        ("generate: no input at all", "/generate", gen(sampling_params=greedy)),
        ("generate: body is not JSON", "/generate", b"{input_ids: [1, 2"),
        ("generate: longer than the context", "/generate",
         gen(input_ids=(prefix * (context_len // max(len(prefix), 1) + 2))[: context_len + 8], sampling_params=greedy)),
        ("generate: max_new_tokens -1", "/generate",
         gen(input_ids=prefix + [5], sampling_params={"temperature": 0.0, "max_new_tokens": -1})),
        ("generate: max_new_tokens not a number", "/generate",
         gen(input_ids=prefix + [5], sampling_params={"max_new_tokens": "ten"})),
        ("generate: temperature -1", "/generate",
         gen(input_ids=prefix + [5], sampling_params={"temperature": -1.0, "max_new_tokens": 4})),
        ("generate: top_p 0", "/generate",
         gen(input_ids=prefix + [5], sampling_params={"top_p": 0.0, "max_new_tokens": 4})),
        ("generate: extra_key not a string", "/generate",
         gen(input_ids=prefix + [5], sampling_params=greedy, extra_key=123)),
        ("generate: logprobs of a prefill on the prefix", "/generate",
         gen(input_ids=prefix + [6], sampling_params=greedy, return_logprob=True, logprob_start_len=0,
             top_logprobs_num=5)),
        ("completions: empty prompt", "/v1/completions", gen(model="default", prompt="", max_tokens=4)),
        ("completions: max_tokens 10**9", "/v1/completions",
         gen(model="default", prompt=prefix + [7], max_tokens=10**9)),
        ("completions: n 0", "/v1/completions", gen(model="default", prompt=prefix + [8], max_tokens=4, n=0)),
        ("abort: unknown request id", "/abort_request", gen(rid="no-such-request")),
    ]


def context_len(model_dir: str | Path) -> int:
    """The context length of a local model folder (`max_position_embeddings` of its `config.json`)."""
    return int(json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"])


def probe(url: str, prefix: list[int], context_len: int, timeout: float = 120.0) -> list[dict]:
    """Send `battery(...)` to the server at `url`, one request at a time; what each got back."""
    out = []
    for name, path, body in battery(prefix, context_len):
        try:
            got = _send(url, path, body, timeout)
        except (OSError, urllib.error.URLError) as err:  # the server dropped the connection or died
            got = {"status": None, "body": f"{type(err).__name__}: {err}"[:300]}
        out.append({"name": name, **got})
    return out
