# SPDX-License-Identifier: Apache-2.0
"""`--kv-compression kvzip` compressing inside the real SGLang 0.5.23 server (CPU, tiny random Llama,
float32). Two servers:

* `kvzip` (ratio 0.5, trigger 64 tokens / 2 hits, `--page-size 16`, `--chunked-prefill-size 128`,
  `--max-running-requests 2`, `--max-total-tokens 1024`, `KVZIP_DUMP_DIR`, `--enable-metrics`, SGLang's
  strict pool checks after every busy step and KV page invariants): the sequence of scenarios.py (r1
  triggers the job; r2..r5 run on the compacted prefix), then a cancelled job, then random requests /
  aborts / compactions / evictions (~70 s);
* `fault` (`KVZIP_FAULT_INJECTION=compaction`, page size 1): every compaction fails and is rolled back.

What the server does is read from the server: responses (`meta_info`), its scheduler log (`Decode batch,
#token: N` = KV slots in use), `/metrics`, and the cache's own dumps (`job-<id>.pt`: kept tokens, `state.json`:
pool accounting when idle).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.integrations.sglang import bad_requests, harness, scenarios

harness.require_sglang()

from kvzip_plugin.hf.attention import install  # noqa: E402
from tests.integrations.reference import check_against_reference  # noqa: E402

PAGE = 16  # the kvzip server's --page-size: prefixes, compacted slots and evictions are whole pages
L = scenarios.PREFIX_LEN // PAGE * PAGE  # the shared 200 tokens hit as 12 pages (192 tokens)
P = L // 2
CHUNK = 128  # the kvzip server's --chunked-prefill-size: the scoring request's repeat input is prefilled in 2 steps
LABELS = {"cache_type": "UnifiedRadixCache", "tp_rank": "0", "pp_rank": "0", "dp_rank": "0"}
STRICT = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1", "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1"}


def _server(model_dir, tmp_path_factory, name: str, *args: str, **env: str):
    root = tmp_path_factory.mktemp(f"sglang_{name}")
    dump = root / "dump"
    server = harness.SGLangServer(
        model_dir, "--dtype", "float32", "--kv-compression", "kvzip", *scenarios.KVZIP_TRIGGER, "--enable-metrics",
        "--decode-log-interval", "1", *args, log_path=root / "server.log",
        env={"KVZIP_DUMP_DIR": str(dump), **STRICT, **env})
    server.dump_dir = dump
    return server


@pytest.fixture(scope="module")
def kvzip_server(sglang_tiny_model_dir, tmp_path_factory):
    server = _server(sglang_tiny_model_dir, tmp_path_factory, "kvzip", "--kv-compression-ratio", "0.5",
                     "--max-running-requests", "2", "--max-total-tokens", "1024", "--page-size", str(PAGE),
                     "--chunked-prefill-size", str(CHUNK), "--kv-compression-structure", "head")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kvzip_seq(kvzip_server):
    before = scenarios.state_seq(kvzip_server.dump_dir)
    seq = scenarios.run_sequence(kvzip_server)
    seq["state"] = scenarios.read_state(kvzip_server.dump_dir, after=before)
    seq["metrics"] = kvzip_server.metrics()
    seq["metrics_text"] = kvzip_server.get_text("/metrics")
    return seq


def _adopted(seq: dict) -> list[dict]:
    return seq["requests"][2:]


def _metric(metrics: dict, name: str, **labels: str) -> float:
    want = {**LABELS, **labels}
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in want.items()):
            total += value
    return total


def test_compacted_prefix_is_hit_with_fewer_slots(kvzip_server, kvzip_seq, sglang_baseline):
    log = kvzip_server.log
    assert f"kvzip-plugin: job 0 committed (head): {L} -> {P} tokens ({L - P} slots saved, SGLang's own slots)" in log
    base = sglang_baseline["sequence"]["requests"]
    for r, b in zip(kvzip_seq["requests"], base, strict=True):
        # SGLang reports logical numbers: the prompt as sent, the cached prefix (whole pages here)
        assert r["prompt_tokens"] == b["prompt_tokens"], r["id"]
        assert r["cached_tokens"] == (0 if r["id"] == "r0" else L), r["id"]
    for r in kvzip_seq["requests"][:2]:  # before the compaction: the full prefix is in use
        assert r["decode_tokens"] and min(r["decode_tokens"]) > L, r
    for r, sfx in zip(_adopted(kvzip_seq), kvzip_seq["suffixes"][2:], strict=True):
        # the scheduler's own count of KV slots in use while the request decodes alone: the P compacted
        # slots + the pages of its own tokens (the prefix's last 8 tokens, its suffix, its outputs)
        own = scenarios.PREFIX_LEN - L + len(sfx)
        assert len(r["decode_tokens"]) >= scenarios.MAX_NEW - 2, r
        assert all(P + own < n <= P + -(-(own + scenarios.MAX_NEW) // PAGE) * PAGE < L for n in r["decode_tokens"]), r
    # requests on the compacted prefix see other KV, so (random model) their outputs change
    assert any(r["tokens"] != b["tokens"] for r, b in zip(_adopted(kvzip_seq), base[2:], strict=True))
    # idle: one compacted prefix of P slots, unpinned; SGLang's pool invariant holds with it as evictable
    state = kvzip_seq["state"]
    assert [(e["L"], e["P"], e["refs"]) for e in state["compacted"]] == [(L, P, 0)]
    assert state["available"] + state["tree_evictable"] + P == state["total"] and state["tree_protected"] == 0
    assert state["compacted_slots_in_free_pool"] == 0 and state["jobs_live"] == 0


def test_metrics(kvzip_seq):
    m = kvzip_seq["metrics"]
    assert _metric(m, "sglang:kvzip_prefixes_compressed_total") == 1
    assert _metric(m, "sglang:kvzip_jobs_total", outcome="submitted") == 1
    assert _metric(m, "sglang:kvzip_jobs_total", outcome="committed") == 1
    assert _metric(m, "sglang:kvzip_jobs_total", outcome="failed") == 0
    assert _metric(m, "sglang:kvzip_compressed_prefix_hits_total") == len(_adopted(kvzip_seq))
    assert _metric(m, "sglang:kvzip_blocks_saved") == (L - P) // PAGE  # pages
    assert _metric(m, "sglang:kvzip_bytes_saved") == (L - P) * 2 * 2 * 2 * 64 * 4  # K+V, 2 layers, 2 heads, fp32
    assert _metric(m, "sglang:kvzip_jobs_running") == 0 and _metric(m, "sglang:kvzip_jobs_queued") == 0
    assert _metric(m, "sglang:kvzip_achieved_ratio_count") == 1 and _metric(m, "sglang:kvzip_achieved_ratio_sum") == 0.5
    assert _metric(m, "sglang:kvzip_scoring_seconds_count") == 1 and _metric(m, "sglang:kvzip_scoring_seconds_sum") > 0
    # scoring / prefill, estimated from the scoring batches' forward time: the repeat input is longer than the
    # prefix's context, so scoring must cost more than one prefill
    assert _metric(m, "sglang:kvzip_scoring_to_prefill_ratio_count") == 1
    assert _metric(m, "sglang:kvzip_scoring_to_prefill_ratio_sum") > 1.0
    assert _metric(m, "sglang:kvzip_compaction_seconds_count") == 1
    assert _metric(m, "sglang:kvzip_decode_step_seconds_count", prefix="compressed") >= 4 * (scenarios.MAX_NEW - 2)
    assert _metric(m, "sglang:kvzip_decode_step_seconds_count", prefix="full") > 0
    # SGLang's own radix-cache series keep their label (the plugin reports as UnifiedRadixCache)
    assert not any('cache_type="KVzipRadixCache"' in k for k in m)


def test_loadgen_summary_reads_the_sglang_series(kvzip_seq):
    """`kvzip load` / the benchmark read SGLang's own series (pool, usage, prefix cache) and the plugin's."""
    from kvzip_plugin.eval.loadgen import parse_metrics, summarize

    out = summarize(None, parse_metrics(kvzip_seq["metrics_text"]), prefix="sglang:")
    e, k = out["engine"], out["kvzip"]
    assert e["block_size"] == PAGE and e["num_gpu_blocks"] == 1024 // PAGE  # --max-total-tokens 1024 in pages
    assert e["kv_cache_usage_perc"] is not None and 0.0 <= e["kv_cache_usage_perc"] <= 1.0
    n = len(kvzip_seq["requests"])
    assert e["prompt_tokens"] >= n * L and 0 < e["prefix_cache_hits"] <= e["prefix_cache_queries"]
    # (+ the server's own warm-up request: no before-snapshot here)
    assert e["generation_tokens"] >= n * scenarios.MAX_NEW and e["num_preemptions"] == 0
    assert e["time_to_first_token_ms"] > 0  # (inter-token latency: streamed requests only; these are not)
    assert k["exported"] and k["prefixes_compressed"] == 1 and k["blocks_saved"] == (L - P) // PAGE
    assert k["jobs"]["committed"] == 1 and k["compressed_prefix_hits"] == len(_adopted(kvzip_seq))
    assert k["scoring_to_prefill_mean"] > 0 and k["achieved_ratio_mean"] == 0.5


def test_outputs_on_compacted_prefix_equal_transformers_reference(kvzip_server, kvzip_seq, sglang_tiny_model_dir):
    from transformers import AutoModelForCausalLM

    dump = torch.load(Path(kvzip_server.dump_dir) / "job-0.pt")
    kept = dump["keep"]  # [layers, H_kv, L]
    assert dump["prefix_len"] == L and set(kept.sum(-1).flatten().tolist()) == {P}
    assert dump["prefix_ids"] == kvzip_seq["prefix"][:L] and not dump["head_pages"]
    assert len({tuple(kept[0, h].tolist()) for h in range(kept.shape[1])}) > 1  # heads keep different tokens
    model = AutoModelForCausalLM.from_pretrained(sglang_tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    install(model.eval())  # KVzipCache's per-head physical slots need KVzip's attention wrapper
    # the prefix's last (partial-page) tokens and the suffix follow the kept pairs at logical positions L, L+1, ...
    gaps = check_against_reference(model, kvzip_seq["prefix"], L, dump["n_protected"], kept, _adopted(kvzip_seq),
                                   kvzip_seq["suffixes"][2:], 1e-4)
    assert gaps and max(gaps) > 1e-2  # the comparison can fail: the full cache gives other logprobs


def _pair_seq(model_dir, tmp_path_factory, name: str, bad: bool = False, **env: str):
    """A `pair` server (page size 1: every head page is one slot of one KV head of one layer); with `bad`, the
    requests of bad_requests.py after the sequence (`seq["bad"]`, the server alive after them, its state)."""
    server = _server(model_dir, tmp_path_factory, name, "--kv-compression-ratio", "0.5",
                     "--max-running-requests", "2", "--max-total-tokens", "1024", "--kv-compression-structure", "pair",
                     **env)
    try:
        before = scenarios.state_seq(server.dump_dir)
        seq = scenarios.run_sequence(server)
        seq["state"] = scenarios.read_state(server.dump_dir, after=before)
        seq["log"] = server.log
        seq["dump"] = torch.load(Path(server.dump_dir) / "job-0.pt")
        if bad:
            seq["bad"] = bad_requests.probe(server.url, seq["prefix"], bad_requests.context_len(model_dir))
            seq["bad_alive"] = server.proc.poll() is None
            seq["bad_after"] = scenarios.generate(server, seq["prefix"] + [77, 78], 4, logprobs=False)
            seq["bad_state"] = scenarios.read_state(server.dump_dir, after=seq["state"]["seq"])
            seq["bad_log"] = server.log[len(seq["log"]):]
        yield seq
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pair_seq(sglang_tiny_model_dir, tmp_path_factory):
    yield from _pair_seq(sglang_tiny_model_dir, tmp_path_factory, "pair", bad=True)


def test_pair_prefix_owns_exactly_its_head_pages_and_answers_like_transformers(pair_seq, sglang_tiny_model_dir):
    assert "attend to the runs through torch" in pair_seq["log"]  # CPU default (KVZIP_PREFIX_ATTENTION=auto)
    # one entry's decode row takes its masked call (`token_decode.EntryDecode`; token_decode's padded one pass only
    # for several entries with few rows each: `attention._token_step`); its prefill rows the per-entry pass. The
    # answers checked below are those of this path.
    assert "attend to the runs through torch (one masked call for one entry's few decode rows)" in pair_seq["log"]
    assert "attend to the runs through torch (one pass for the step's decode rows)" not in pair_seq["log"]
    _check_pair_seq(pair_seq, sglang_tiny_model_dir)


def test_pair_server_answers_bad_requests_as_sglang_does_without_the_plugin(pair_seq, sglang_baseline):
    """The hostile probe on a head-page (`pair`) entry: the answers of the server without the plugin, the
    server up, the entry still serving and its slots accounted for, no traceback."""
    assert [(r["name"], r["status"]) for r in pair_seq["bad"]] == \
        [(r["name"], r["status"]) for r in sglang_baseline["bad_requests"]], (pair_seq["bad"], sglang_baseline)
    _same_logprob_prefill(pair_seq["bad"], sglang_baseline["bad_requests"])
    assert pair_seq["bad_alive"] and len(pair_seq["bad_after"]["output_ids"]) == 4
    assert pair_seq["bad_after"]["meta_info"]["cached_tokens"] == scenarios.PREFIX_LEN  # on the compacted entry
    state = pair_seq["bad_state"]
    assert state["jobs_live"] == 0 and state["tree_protected"] == 0 and state["compacted_slots_in_free_pool"] == 0
    assert state["available"] + state["tree_evictable"] + sum(e["P"] for e in state["compacted"]) == state["total"]
    assert "Traceback" not in pair_seq["bad_log"], pair_seq["bad_log"][-4000:]


def _same_logprob_prefill(got: list[dict], want: list[dict]) -> None:
    """A request for the input logprobs of the whole prompt (`logprob_start_len=0`) on a compressed prefix must
    prefill the prompt in full, as SGLang does without the plugin: every input logprob, the same greedy tokens."""
    g, w = ([r for r in rs if r["name"].startswith("generate: logprobs")][0] for rs in (got, want))
    assert g["status"] == w["status"] == 200
    assert g["input_logprobs"] == w["input_logprobs"] == len(scenarios.prefix_ids()) + 1, (g, w)
    assert g["output_ids"] == w["output_ids"]


def test_pair_through_the_triton_kernel_answers_like_transformers(sglang_tiny_model_dir, tmp_path_factory):
    """The CUDA path of head-page attention (the Triton kernel reading the per-layer key and value
    buffers in place), forced on CPU under Triton's interpreter: the same store and answers."""
    pytest.importorskip("triton")
    for seq in _pair_seq(sglang_tiny_model_dir, tmp_path_factory, "pair_triton", KVZIP_PREFIX_ATTENTION="triton",
                         TRITON_INTERPRET="1"):
        assert "attend to the runs through the Triton kernel" in seq["log"]
        assert "through torch" not in seq["log"]
        _check_pair_seq(seq, sglang_tiny_model_dir)


def _check_pair_seq(pair_seq, sglang_tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from kvzip_plugin.store import place_runs

    dump, prefix = pair_seq["dump"], pair_seq["prefix"]
    L1 = scenarios.PREFIX_LEN  # page size 1: the whole shared prefix is compressed
    keep = dump["keep"]
    lengths = keep.sum(-1)
    assert dump["structure"] == "pair" and dump["head_pages"] and dump["prefix_len"] == L1
    # the scoring batches and the batches with requests on the entry were marked to decline graph replays,
    # the other batches (client prefills of the full prefix) were not
    marks = pair_seq["state"]["graph_marks"]
    assert marks["eager"] > 0 and marks["graphs"] > 0, marks
    assert len(set(lengths.flatten().tolist())) > 1  # each (layer, KV head) its own count
    n_slots = place_runs(lengths, 1).n_blocks  # one slot = n_layers * H_kv head pages
    assert dump["physical_length"] == n_slots == -(-int(lengths.sum()) // lengths.numel()) < L1
    assert f"kvzip-plugin: job 0 committed (pair): {L1} -> {n_slots} tokens ({L1 - n_slots} slots saved, " \
           "head pages)" in pair_seq["log"]
    state = pair_seq["state"]
    assert [(e["L"], e["P"], e["refs"]) for e in state["compacted"]] == [(L1, n_slots, 0)]
    assert state["available"] + state["tree_evictable"] + n_slots == state["total"]
    assert state["compacted_slots_in_free_pool"] == 0 and state["jobs_live"] == 0
    model = AutoModelForCausalLM.from_pretrained(sglang_tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    install(model.eval())
    assert all(r["cached_tokens"] == L1 for r in _adopted(pair_seq))
    # SGLang's CPU backend did not compute these requests' attention (the plugin writes it): at least their
    # prefill and one decode step in every layer
    assert state["native_rows_skipped"] >= 2 * keep.shape[0] * len(_adopted(pair_seq)), state["native_rows_skipped"]
    gaps = check_against_reference(model, prefix, L1, dump["n_protected"], keep, _adopted(pair_seq),
                                   pair_seq["suffixes"][2:], 2e-4)
    assert len(gaps) == 4 and max(gaps) > 1e-2  # the comparison can fail: the full cache gives other logprobs


def _assert_scores_equal_transformers(dump: dict, prefix: list[int], model_dir, min_repeat: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvzip_plugin.hf.cache import KVzipCache as Cache
    from kvzip_plugin.hf.compressor import KVzipCompressor
    from kvzip_plugin.hf.template import ContextLayout, template_parts

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    comp = KVzipCompressor(model, tok)
    n_p, ids = dump["n_protected"], prefix[:L]
    layout = ContextLayout(tuple(ids[:n_p]), tuple(ids[n_p:]), template_parts(tok).postfix_ids)
    repeat_len = sum(len(c) for c in [layout.postfix_ids]) + L - n_p
    assert repeat_len > min_repeat  # the server prefilled the scoring request's repeat input in several steps
    ref = comp.score(layout, Cache.from_dynamic(comp.prefill(layout.input_ids))).scores
    assert ref.shape == dump["scores"].shape
    torch.testing.assert_close(dump["scores"], ref, rtol=1e-4, atol=1e-5)


def test_scores_equal_the_transformers_scoring_pass(kvzip_server, kvzip_seq, sglang_tiny_model_dir):
    """The scores captured inside SGLang (from the paged pool, over two chunked-prefill steps of the repeat
    input) equal KVzipCompressor.score's on the same prefix, per (layer, KV head, context token)."""
    dump = torch.load(Path(kvzip_server.dump_dir) / "job-0.pt")
    _assert_scores_equal_transformers(dump, kvzip_seq["prefix"], sglang_tiny_model_dir, CHUNK)


def test_scoring_runs_in_slices_between_decode_steps(sglang_tiny_model_dir, tmp_path_factory):
    """With clients decoding, a job's scoring prefill goes in slices of at most the step tokens, with a decode
    round between two slices (slicing.py); the scores still equal the transformers scoring pass (slicing moves
    where the repeat input is cut, not what is scored), and every client request is answered. A second job
    without clients scores in idle slices; a third, with client prefills all through it, parks its started
    scoring request for their rounds and still scores right."""
    import re

    step = 32
    server = _server(sglang_tiny_model_dir, tmp_path_factory, "sliced", "--kv-compression-ratio", "0.5",
                     "--max-running-requests", "4", "--max-total-tokens", "2048", "--page-size", str(PAGE),
                     "--chunked-prefill-size", str(CHUNK), "--kv-compression-structure", "head",
                     "--kv-compression-scoring-step-tokens", str(step),
                     # any slowdown: slices share the decoding clients' rounds whatever this machine's step
                     # times (the gate's timing rules: tests/core/test_slicing.py)
                     "--kv-compression-scoring-max-slowdown", "1000")
    stop, answered, errors = threading.Event(), [], []

    def decode_client(seed: int) -> None:
        while not stop.is_set():
            try:
                out = scenarios.generate(server, scenarios.prefix_ids(100 + seed, 40), max_new=60, logprobs=False)
                answered.append(len(out["output_ids"]))
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(repr(exc))
                return

    job_done = threading.Event()

    def prefill_client() -> None:  # new short requests all through the third job: client prefills beside it
        i = 0
        while not job_done.is_set():
            try:
                scenarios.generate(server, scenarios.prefix_ids(200 + i, 24), max_new=1, logprobs=False)
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(repr(exc))
                return
            i += 1

    threads = [threading.Thread(target=decode_client, args=(i,), daemon=True) for i in range(2)]
    prefiller = threading.Thread(target=prefill_client, daemon=True)
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)  # the clients decode before the job starts
        prefix = scenarios.prefix_ids()
        start = server.log_offset()
        for sfx in scenarios.SUFFIXES[:2]:  # the second hit queues the job
            scenarios.generate(server, prefix + list(sfx))
        found = scenarios.wait_for_log(server, r"kvzip-plugin: job \d+ committed.*", timeout=240, start=start)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        log = server.log
        assert found, log[-4000:]
        m = re.search(r"scoring slices: (\d+) tokens now, (\d+) slices, (\d+) held, (\d+) decode rounds between, "
                      r"(\d+) client prefills alone", found.group(0))
        assert m, found.group(0)
        now, slices, _, deferred, parked = map(int, m.groups())
        assert now <= step and slices > 2 and deferred > 0, found.group(0)
        # the slices' attention went through native_backend.py (their new rows only, not the whole sequence)
        assert scenarios.read_state(server.dump_dir)["native_extend_rows"] >= 2 * slices  # 2 layers
        assert not errors and answered and set(answered) == {60}, (errors, answered)
        _assert_scores_equal_transformers(torch.load(Path(server.dump_dir) / "job-0.pt"), prefix,
                                          sglang_tiny_model_dir, step)
        # a second job with no client at all: its scoring prefill still goes in slices of at most `step`
        # (the idle slice), not at SGLang's chunk size (CHUNK) as before
        other, start = scenarios.prefix_ids(seed=7), server.log_offset()
        for sfx in scenarios.SUFFIXES[:2]:
            scenarios.generate(server, other + list(sfx), max_new=1)
        found = scenarios.wait_for_log(server, r"kvzip-plugin: job \d+ committed.*", timeout=240, start=start)
        assert found, server.log[-4000:]
        m2 = re.search(r"(\d+) slices, .*idle slice (\d+) tokens", found.group(0))
        assert m2 and int(m2.group(1)) - slices >= scenarios.PREFIX_LEN // step, found.group(0)
        assert int(m2.group(2)) <= step, found.group(0)
        # a third job with client prefills all through it: their rounds run without a scoring slice (the started
        # scoring request parked: SGLang's add_chunked_req adds nothing for it), and it still scores right
        third, start = scenarios.prefix_ids(seed=11), server.log_offset()
        scenarios.generate(server, third + list(scenarios.SUFFIXES[0]), max_new=1)
        prefiller.start()
        scenarios.generate(server, third + list(scenarios.SUFFIXES[1]), max_new=1)
        found = scenarios.wait_for_log(server, r"kvzip-plugin: job (\d+) committed.*", timeout=240, start=start)
        job_done.set()
        prefiller.join(timeout=120)
        assert found and not errors, (server.log[-4000:], errors)
        m3 = re.search(r"(\d+) client prefills alone", found.group(0))
        assert m3 and int(m3.group(1)) > parked, found.group(0)
        _assert_scores_equal_transformers(torch.load(Path(server.dump_dir) / f"job-{found.group(1)}.pt"), third,
                                          sglang_tiny_model_dir, step)
    finally:
        stop.set()
        job_done.set()
        server.stop()


def test_cancelled_job_rolls_back(kvzip_server, kvzip_seq):
    """A job whose scoring request is aborted (`/abort_request` with abort_all) while it waits for a batch
    slot (`--max-running-requests 2`, both taken by long requests) is cancelled: nothing is compacted, the
    prefix stays in the tree, later requests get SGLang's usual hit."""
    server = kvzip_server
    prefix = scenarios.prefix_ids(seed=1)
    first = scenarios.generate(server, prefix + [71, 72, 73])
    cancelled0 = server.metric("sglang:kvzip_jobs_total", outcome="cancelled")
    start, before = server.log_offset(), scenarios.state_seq(server.dump_dir)
    threads = [threading.Thread(target=scenarios.generate, args=(server, ids, 300), kwargs={"logprobs": False})
               for ids in (scenarios.prefix_ids(seed=9, n=40), prefix + [81, 82])]
    threads[0].start()  # an unrelated long request takes the first batch slot
    assert scenarios.wait_for_log(server, r"Decode batch, #running-req: 1,", timeout=60, start=start)
    threads[1].start()  # the second hit on the prefix queues a job and takes the second slot
    try:
        # logged when the scoring request is queued, behind two requests with ~290 decode steps left
        scoring = scenarios.wait_for_log(server, r"kvzip-plugin: job (\d+) scoring", timeout=60, start=start)
        assert scoring, server.log[-3000:]
    finally:
        server.abort(abort_all=True)
        for t in threads:
            t.join(120)
    job = scoring.group(1)
    assert scenarios.wait_for_log(server, rf"kvzip-plugin: job {job} cancelled: scoring request "
                                          rf"kvzip-score-{job}-0 was aborted", timeout=30, start=start)
    state = scenarios.read_state(server.dump_dir, after=before)
    assert state["jobs_live"] == 0 and [e["L"] for e in state["compacted"]] == [L]  # the sequence's prefix only
    assert state["scoring_targets"] == 0 and state["tree_protected"] == 0
    assert server.metric("sglang:kvzip_jobs_total", outcome="cancelled") == cancelled0 + 1
    again = scenarios.generate(server, prefix + [71, 72, 73])
    # SGLang's own hit (all but the last token, in whole pages): the tree untouched
    assert again["meta_info"]["cached_tokens"] == (len(prefix) + 2) // PAGE * PAGE
    assert again["output_ids"] == first["output_ids"]


def test_bad_requests_get_the_answers_they_get_without_the_plugin(kvzip_server, kvzip_seq, sglang_baseline,
                                                                  sglang_tiny_model_dir):
    """The hostile probe on SGLang (issue 16): every request of bad_requests.py gets the HTTP status the
    server without the plugin gives it (several reach the compacted prefix), the server stays up, the
    compacted prefix still serves, the pool is back to its idle accounting, and the log has no traceback."""
    server = kvzip_server
    start = server.log_offset()
    before = scenarios.state_seq(server.dump_dir)
    got = bad_requests.probe(server.url, scenarios.prefix_ids(), bad_requests.context_len(sglang_tiny_model_dir))
    want = sglang_baseline["bad_requests"]
    assert sglang_baseline["alive_after_bad_requests"]
    assert [(r["name"], r["status"]) for r in got] == [(r["name"], r["status"]) for r in want], (got, want)
    _same_logprob_prefill(got, want)
    assert any(r["status"] == 200 for r in got) and any(r["status"] and r["status"] >= 400 for r in got)
    assert server.proc.poll() is None
    # the counters are published on the scheduler's first idle pump after work, which may come after the
    # HTTP reply: read them from settled states only
    settled = scenarios.read_state(server.dump_dir, after=before)
    hits = server.metric("sglang:kvzip_compressed_prefix_hits_total")
    out = scenarios.generate(server, scenarios.prefix_ids() + [77, 78], 4, logprobs=False)
    assert len(out["output_ids"]) == 4
    state = scenarios.read_state(server.dump_dir, after=settled["seq"])
    assert server.metric("sglang:kvzip_compressed_prefix_hits_total") == hits + 1  # the compacted prefix serves
    assert state["jobs_live"] == 0 and all(e["refs"] == 0 for e in state["compacted"]) and state["tree_protected"] == 0
    assert state["available"] + state["tree_evictable"] + sum(e["P"] for e in state["compacted"]) == state["total"]
    log = server.log[start:]
    assert "Traceback" not in log and "leak detected" not in log, log[-4000:]


def test_no_slot_leaks_after_random_requests_aborts_and_compactions(kvzip_server, kvzip_seq):
    """Random concurrent requests on three prefixes (one compacted already, two compacted during the run),
    random aborts, then one long request that forces SGLang to evict the tree and the compacted prefixes.
    SGLang's strict pool checks run after every busy step (STRICT) and at idle; the cache's idle dump must
    account for every slot and keep no compacted slot in the free pool."""
    server = kvzip_server
    rng = random.Random(0)
    before = scenarios.state_seq(server.dump_dir)
    prefixes = [scenarios.prefix_ids(seed) for seed in (0, 2, 3)]
    errors: list[str] = []
    threads, live = [], []

    def run(rid: str, ids: list[int], n: int) -> None:
        try:
            scenarios.generate(server, ids, n, logprobs=False, rid=rid)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(f"{rid}: {exc!r}")

    aborted = 0
    for op in range(50):
        if rng.random() < 0.6 or not live:
            rid = f"churn-{op}-{uuid.uuid4().hex[:6]}"
            ids = rng.choice(prefixes) + [rng.randrange(50, 450) for _ in range(rng.randrange(1, 40))]
            t = threading.Thread(target=run, args=(rid, ids, rng.randrange(2, 30)))
            t.start()
            threads.append(t)
            live.append(rid)
        else:
            server.abort(live.pop(rng.randrange(len(live))))
            aborted += 1
        time.sleep(rng.random() * 0.1)
    for t in threads:
        t.join(180)
    assert not errors and aborted >= 5
    state = scenarios.read_state(server.dump_dir, after=before)
    assert len(state["compacted"]) >= 2 and state["jobs_live"] == 0, state  # more prefixes compacted meanwhile
    hits_before = server.metric("sglang:kvzip_compressed_prefix_hits_total")
    assert hits_before > len(_adopted(kvzip_seq))
    # a prompt longer than what is free + the tree's evictable part: SGLang must evict compacted prefixes
    total, free = state["total"], state["available"] + state["tree_evictable"]
    long_prompt = [rng.randrange(50, 450) for _ in range(min(free + 60, 1000))]
    scenarios.generate(server, long_prompt, 4, logprobs=False)
    after = scenarios.read_state(server.dump_dir, after=state["seq"])
    assert len(after["compacted"]) < len(state["compacted"])
    for s in (state, after):
        assert all(e["refs"] == 0 for e in s["compacted"]) and s["tree_protected"] == 0
        assert s["available"] + s["tree_evictable"] + sum(e["P"] for e in s["compacted"]) == total
        assert s["compacted_slots_in_free_pool"] == 0 and s["scoring_targets"] == 0
    log = server.log
    assert "Leak" not in log and "leak detected" not in log and "double free" not in log
    assert server.proc.poll() is None


def test_sglang_bench_serving_runs_from_this_venv(kvzip_server, kvzip_seq, sglang_tiny_model_dir, tmp_path):
    """SGLang's own client (`python -m sglang.bench_serving`, generated-shared-prefix: groups of prompts on one
    system prompt) as a user runs it from this venv (`benchmarks/engine_clients.py sglang ...`) on the kvzip
    server: every request completes, and a shared prefix is compressed while it runs."""
    import json
    import subprocess
    import sys

    server = kvzip_server
    before = server.metric("sglang:kvzip_prefixes_compressed_total")
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([
        sys.executable, "benchmarks/engine_clients.py", "sglang", "--backend", "sglang", "--base-url", server.url,
        "--tokenizer", str(sglang_tiny_model_dir), "--dataset-name", "generated-shared-prefix",
        "--gsp-num-groups", "2", "--gsp-prompts-per-group", "4", "--gsp-system-prompt-len", "160",
        "--gsp-question-len", "16", "--gsp-output-len", "4", "--max-concurrency", "2", "--seed", "0",
        "--disable-tqdm", "--output-file", str(out)],
        cwd=harness.REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert result["completed"] == 8, result
    deadline = time.monotonic() + 60
    while server.metric("sglang:kvzip_prefixes_compressed_total") <= before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.metric("sglang:kvzip_prefixes_compressed_total") > before


@pytest.fixture(scope="module")
def fault_seq(sglang_tiny_model_dir, tmp_path_factory):
    server = _server(sglang_tiny_model_dir, tmp_path_factory, "fault", "--kv-compression-ratio", "0.5",
                     KVZIP_FAULT_INJECTION="compaction")
    try:
        before = scenarios.state_seq(server.dump_dir)
        seq = scenarios.run_sequence(server, settle_each=True)  # retried jobs never share a client's batch
        seq["state"] = scenarios.read_state(server.dump_dir, after=before)
        seq["metrics"] = server.metrics()
        seq["log"] = server.log
    finally:
        server.stop()
    return seq


def test_failed_job_leaves_the_cache_as_it_was(fault_seq, sglang_baseline):
    base = sglang_baseline["sequence"]["requests"]
    m, state = fault_seq["metrics"], fault_seq["state"]
    assert "kvzip-plugin: job 0 failed: RuntimeError: fault injected (KVZIP_FAULT_INJECTION=compaction)" in \
        fault_seq["log"]
    assert _metric(m, "sglang:kvzip_jobs_total", outcome="failed") >= 1
    assert _metric(m, "sglang:kvzip_jobs_total", outcome="committed") == 0
    assert _metric(m, "sglang:kvzip_compressed_prefix_hits_total") == 0
    for r, b in zip(fault_seq["requests"], base, strict=True):
        assert r["tokens"] == b["tokens"] and r["logprobs"] == b["logprobs"], r["id"]
        assert (r["prompt_tokens"], r["cached_tokens"]) == (b["prompt_tokens"], b["cached_tokens"]), r["id"]
    # every slot is free or in the tree again: the destination slots were freed, the tree lock released
    assert state["compacted"] == [] and state["jobs_live"] == 0 and state["scoring_targets"] == 0
    assert state["available"] + state["tree_evictable"] == state["total"] and state["tree_protected"] == 0


def test_head_level_scorer_serves_whole_heads_without_a_scoring_pass(sglang_tiny_model_dir, tmp_path_factory):
    """`--kv-compression-scorer kvzip_head`: no scoring request; the best half of the (layer, KV head)
    spans by the head-score file are kept whole, the rest keep the protected tokens; the answers equal
    transformers on the same kept pairs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvzip_plugin.head_scores import save_head_scores

    cfg = AutoConfig.from_pretrained(sglang_tiny_model_dir)
    n_runs = cfg.num_hidden_layers * cfg.num_key_value_heads
    heads = torch.randperm(n_runs, generator=torch.Generator().manual_seed(0)).float().view(
        cfg.num_hidden_layers, cfg.num_key_value_heads)
    path = tmp_path_factory.mktemp("heads") / "heads.json"
    save_head_scores(path, heads, cfg, "tiny", "test")
    server = _server(sglang_tiny_model_dir, tmp_path_factory, "kvzip_head", "--kv-compression-ratio", "0.5",
                     "--max-running-requests", "2", "--max-total-tokens", "1024", "--kv-compression-scorer",
                     "kvzip_head", "--kv-compression-head-scores", str(path))
    try:
        seq = scenarios.run_sequence(server)
        log = server.log
        dump = torch.load(Path(server.dump_dir) / "job-0.pt")
    finally:
        server.stop()
    assert "head-level scores (no scoring pass)" in log and "chunk(s)" not in log
    keep, n_p, L1 = dump["keep"], dump["n_protected"], scenarios.PREFIX_LEN
    whole = heads.flatten().argsort(descending=True)[:n_runs // 2]
    lengths = keep.sum(-1).flatten()
    assert sorted(lengths[whole].tolist()) == [L1] * (n_runs // 2)
    others = [i for i in range(n_runs) if i not in set(whole.tolist())]
    assert lengths[others].tolist() == [n_p] * len(others)  # page size 1: nothing rounds up
    model = AutoModelForCausalLM.from_pretrained(sglang_tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    install(model.eval())
    assert all(r["cached_tokens"] == L1 for r in _adopted(seq))
    check_against_reference(model, seq["prefix"], L1, n_p, keep, _adopted(seq), seq["suffixes"][2:], 2e-4)

