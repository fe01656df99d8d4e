# SPDX-License-Identifier: Apache-2.0
"""Scenarios of `--kv-compression kvzip` on the real vLLM engine (CPU), one per fresh process.

Driven through `LLMEngine.add_request`/`step` with EngineCore in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the scheduler's block pool and the connector can be
inspected between steps. Prints `RESULT <json>` on the last line. Not a test module.

    python -m tests.integrations.vllm.run_kvzip MODEL_DIR SCENARIO [RATIO]

Scenarios: `sequential` (one request at a time on a shared prefix), `mixed` (one batch of requests
on a compacted prefix, on a prefix being scored, and plain), `salts` (two tenants, same
prefix, different cache salts), `churn` (random admissions and aborts while prefixes compress),
`cancel` (the prefix cache is reset while a job scores), `repeat` (the same prompt twice), `stores`
(one batch decoding on two compacted prefixes at once, beside a plain request), `crowd` (enough requests on one
compacted prefix for the cascade, a late one prefilling beside them), `sliced`
(a job scores beside decoding clients and a late client prefill; every step's scheduled tokens).
`KVZIP_TEST_PREFIX_CACHING=0` turns vLLM's prefix caching off; `KVZIP_TEST_TP=2` runs tensor parallelism
over two CPU workers (the `mp` executor: the workers are other processes, so `prefix_attention` is None).
"""

from __future__ import annotations

import json
import os
import random
import sys

BLOCK_SIZE = 32
PREFIX_LEN = 6 * BLOCK_SIZE + 8  # 6 full blocks shared (192 tokens) + a partial one
MAX_TOKENS = 12
SUFFIXES = ([11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36], [41, 42], [51, 52, 53], [61, 62])


def prefix_ids(seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50, 450) for _ in range(PREFIX_LEN)]


def make_llm(model_dir: str, max_num_seqs: int = 4):
    from vllm import LLM

    prefix_caching = os.environ.get("KVZIP_TEST_PREFIX_CACHING", "1") == "1"
    dtype = os.environ.get("KVZIP_TEST_DTYPE", "float32")  # GPU runs: bfloat16 (FlashAttention)
    tp = int(os.environ.get("KVZIP_TEST_TP", "1"))
    parallel = {} if tp == 1 else {"tensor_parallel_size": tp, "gpu_memory_utilization": 0.2}
    return LLM(model=model_dir, tokenizer=model_dir, dtype=dtype, enable_prefix_caching=prefix_caching,
               block_size=BLOCK_SIZE, max_model_len=1024, max_num_seqs=max_num_seqs, enforce_eager=True, seed=0,
               distributed_executor_backend="uni" if tp == 1 else "mp", disable_log_stats=False, **parallel)


class Harness:
    def __init__(self, llm) -> None:
        self.llm = llm
        self.engine = llm.llm_engine
        self.scheduler = self.engine.engine_core.engine_core.scheduler
        self.kvcm = self.scheduler.kv_cache_manager
        self.pool = self.kvcm.block_pool
        self.connector = self.scheduler.connector
        self.max_blocks: dict[str, int] = {}
        self.offsets: dict[str, int] = {}
        # what vLLM's own series report (SchedulerStats of every step): prefix-cache counters, request gauges
        self.engine_stats = {"prefix_requests": 0, "prefix_queries": 0, "prefix_hits": 0, "max_running": 0,
                             "max_waiting": 0}
        make_stats = self.scheduler.make_stats

        def recording_make_stats(*args, **kwargs):
            stats = make_stats(*args, **kwargs)
            if stats is not None:
                e, p = self.engine_stats, stats.prefix_cache_stats
                e["prefix_requests"] += p.requests
                e["prefix_queries"] += p.queries
                e["prefix_hits"] += p.hits
                e["max_running"] = max(e["max_running"], stats.num_running_reqs)
                e["max_waiting"] = max(e["max_waiting"], stats.num_waiting_reqs)
            return stats

        self.scheduler.make_stats = recording_make_stats

    def blocks_of(self, rid: str) -> int:
        manager = self.kvcm.coordinator.single_type_managers[0]
        return len(manager.req_to_blocks.get(rid, []))

    def add(self, rid: str, ids: list[int], salt: str | None = None, logprobs: int | None = 1,
            max_tokens: int = MAX_TOKENS) -> None:
        from vllm import SamplingParams

        prompt = {"prompt_token_ids": ids}
        if salt is not None:
            prompt["cache_salt"] = salt
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
        self.engine.add_request(rid, prompt, params)

    def step(self) -> list:
        outs = self.engine.step()
        for rid in list(self.scheduler.requests):
            self.max_blocks[rid] = max(self.max_blocks.get(rid, 0), self.blocks_of(rid))
        sched = self.connector.sched if self.connector is not None else None
        for rid, prefix in (sched.offsets.items() if sched else ()):
            self.offsets[rid] = prefix.logical_length - prefix.physical_length
        return outs

    def run(self, rid: str, ids: list[int], salt: str | None = None) -> dict:
        self.add(rid, ids, salt)
        final = None
        while final is None:
            for out in self.step():
                if out.request_id == rid and out.finished:
                    final = out
        comp = final.outputs[0]
        return {
            "id": rid,
            "tokens": list(comp.token_ids),
            "logprobs": [lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids, strict=True)],
            "num_cached_tokens": final.num_cached_tokens,
            "blocks": self._lookup(self.max_blocks, rid, 0),
            "offset": self._lookup(self.offsets, rid, None),
        }

    def step_batch(self, batch: dict, done: dict) -> None:
        """One step; record each request of `batch` that finished in it into `done` (tokens, logprobs, offset)."""
        for out in self.step():
            rid = out.request_id.split("-")[0]
            if out.finished and rid in batch:
                comp = out.outputs[0]
                done[rid] = {"id": rid, "tokens": list(comp.token_ids),
                             "logprobs": [lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids, strict=True)],
                             "offset": self._lookup(self.offsets, rid, None)}

    @staticmethod
    def _lookup(table: dict, rid: str, default):
        """vLLM appends a random suffix to external request ids (`r0` -> `r0-1a2b3c4d`)."""
        return next((v for k, v in table.items() if k == rid or k.startswith(rid + "-")), default)

    def drain(self, limit: int = 200) -> None:
        """Step until the scheduler has no work left (scoring and compaction included)."""
        for _ in range(limit):
            if not self.scheduler.has_requests():
                return
            self.step()
        raise RuntimeError("engine did not go idle")

    def pool_state(self) -> dict:
        blocks = self.pool.blocks
        return {
            "num_blocks": len(blocks),
            "free": self.pool.get_num_free_blocks(),
            "referenced": sorted(b.block_id for b in blocks if b.ref_cnt > 0 and not b.is_null),
            "cached": len([b for b in blocks if b.block_hash is not None]),
        }

    def kvzip_state(self) -> dict | None:
        if self.connector is None:
            return None
        sched = self.connector.sched
        return {
            "compacted": [{"L": p.logical_length, "P": p.physical_length, "blocks": [b.block_id for b in p.blocks],
                           "alive": p.alive(), "head_pages": p.head_pages, "store_id": p.store_id}
                          for p in sched.compacted.values()],
            "structure": sched.config.structure,
            "jobs_live": len(sched.jobs),
            "finished": {s.value: n for s, n in sched.queue.finished.items()},
            "offsets": {rid: p.logical_length - p.physical_length for rid, p in sched.offsets.items()},
            "disabled": self.connector.disabled,
            "prefix_attention": self.prefix_attention(),
            "forwards_skipped": self.forwards_skipped(),
        }

    @staticmethod
    def forwards_skipped() -> int | None:
        """Layer forwards of vLLM the worker skipped (every row of the step on a head-page store)."""
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        worker = getattr(get_kv_transfer_group(), "worker", None) if has_kv_transfer_group() else None
        return None if worker is None else worker.forwards_skipped

    @staticmethod
    def prefix_attention() -> str | None:
        """How the worker's head-page stores were read ("KernelRuns": the Triton kernel; "vllm_cpu_kernel": vLLM's
        CPU kernel; "torch"); the
        worker is in this process (executor "uni"). None without a store."""
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        worker = getattr(get_kv_transfer_group(), "worker", None) if has_kv_transfer_group() else None
        stores = list(worker.store_index.stores.values()) if worker is not None else []
        if not stores:
            return None
        if any(k[0] == "kernel" and v is not None for s in stores for k, v in s._on.items()):
            return "KernelRuns"
        if any(k[0] == "vllm_cpu_kernel" and v is not None for s in stores for k, v in s._on.items()):
            return "vllm_cpu_kernel"
        return "torch"


def sequential(h: Harness) -> dict:
    prefix = prefix_ids()
    results = []
    for i, sfx in enumerate(SUFFIXES):
        rid = f"r{i}"
        res = h.run(rid, prefix + list(sfx))
        results.append(res)
    h.drain()
    return {"prefix": prefix, "suffixes": [list(s) for s in SUFFIXES], "requests": results,
            "kvzip": h.kvzip_state(), "pool": h.pool_state(), "engine_stats": h.engine_stats}


def salts(h: Harness) -> dict:
    prefix = prefix_ids()
    out = {"a": [], "b": []}
    for i, sfx in enumerate(SUFFIXES[:4]):
        out["a"].append(h.run(f"a{i}", prefix + list(sfx), salt="tenant-a"))
    h.drain()
    state_after_a = h.kvzip_state()
    for i, sfx in enumerate(SUFFIXES[:2]):
        out["b"].append(h.run(f"b{i}", prefix + list(sfx), salt="tenant-b"))
    h.drain()
    return {"requests": out, "kvzip_after_a": state_after_a, "kvzip": h.kvzip_state(), "pool": h.pool_state()}


def churn(h: Harness, n_ops: int = 60, seed: int = 0) -> dict:
    rng = random.Random(seed)
    prefixes = [prefix_ids(s) for s in range(3)]
    live: list[str] = []
    aborted = finished = 0
    for op in range(n_ops):
        action = rng.random()
        if action < 0.45 or not live:
            rid = f"c{op}"
            ids = rng.choice(prefixes) + [rng.randrange(50, 450) for _ in range(rng.randrange(1, 40))]
            h.add(rid, ids, salt=rng.choice([None, None, "t1"]), logprobs=None)
            live.append(rid)
        elif action < 0.6:
            rid = live.pop(rng.randrange(len(live)))
            h.engine.abort_request([rid])
            aborted += 1
        for out in h.step():
            if out.finished and out.request_id in live:
                live.remove(out.request_id)
                finished += 1
    while live:
        for out in h.step():
            if out.finished and out.request_id in live:
                live.remove(out.request_id)
                finished += 1
    h.drain()
    return {"aborted": aborted, "finished": finished, "kvzip": h.kvzip_state(), "pool": h.pool_state()}


def cancel(h: Harness) -> dict:
    """The prefix cache is reset while a job scores and a client request (r1) runs, as
    `POST /reset_prefix_cache?reset_external=true` does: with `KVZIP_TEST_RESET=running` (+
    `reset_running_requests=true`) vLLM preempts r1 and the reset must succeed, cancelling and rolling back
    the job; with `KVZIP_TEST_RESET=refused` vLLM refuses the reset (r1 holds blocks) and the job must go
    on to its commit."""
    kind = os.environ.get("KVZIP_TEST_RESET", "running")
    prefix = prefix_ids()
    first = h.run("r0", prefix + list(SUFFIXES[0]))
    h.add("r1", prefix + list(SUFFIXES[1]))
    for _ in range(50):  # until the job is scoring (its request was added to the scheduler)
        h.step()
        if any(j.job.status.value == "scoring" for j in h.connector.sched.jobs.values()):
            break
    else:
        raise RuntimeError("the job never started scoring")
    jobs_before = len(h.connector.sched.jobs)
    try:
        reset = h.scheduler.reset_prefix_cache(reset_running_requests=kind == "running", reset_connector=True)
    except RuntimeError as exc:  # what `/reset_prefix_cache` turns into an HTTP 500
        reset = f"RuntimeError: {exc}"
    second = None
    while second is None:  # r1 (preempted and recomputed after a reset) runs to its end
        second = next((o for o in h.step() if o.request_id == "r1" and o.finished), None)
    h.drain()
    later = h.run("r2", prefix + list(SUFFIXES[2]))
    h.drain()
    return {"requests": [first, later], "r1_tokens": list(second.outputs[0].token_ids),
            "jobs_before_reset": jobs_before, "reset": reset, "kvzip": h.kvzip_state(), "pool": h.pool_state()}


def repeat(h: Harness) -> dict:
    """The same prompt twice (no job: nothing else continues its prefix), then another prompt on the prefix."""
    prefix = prefix_ids()
    first = h.run("r0", prefix + list(SUFFIXES[0]))
    again = h.run("r0-again", prefix + list(SUFFIXES[0]))
    h.drain()
    after_repeat = h.kvzip_state()
    other = h.run("r1", prefix + list(SUFFIXES[1]))
    h.drain()
    return {"requests": [first, again, other], "kvzip_after_repeat": after_repeat, "kvzip": h.kvzip_state()}


def mixed(h: Harness) -> dict:
    """One batch mixing requests on a compacted prefix (A), a request on another prefix (B) whose
    scoring requests run in the same steps, and a plain request."""
    a, b = prefix_ids(0), prefix_ids(1)
    warm = [h.run("w0", a + list(SUFFIXES[0])), h.run("w1", a + list(SUFFIXES[1]))]
    h.drain()  # A compacted
    warm.append(h.run("v0", b + list(SUFFIXES[0])))
    # max_num_seqs is 4: p1 stops early so the scoring request of B's job joins a1, a2 and b1's steps
    batch = {"a1": a + list(SUFFIXES[2]), "a2": a + list(SUFFIXES[3]), "b1": b + list(SUFFIXES[4]),
             "p1": prefix_ids(7)[:40]}
    for rid, ids in batch.items():
        h.add(rid, ids, max_tokens=2 if rid == "p1" else 3 * MAX_TOKENS)
    done: dict = {}
    scoring_steps_with_a = 0
    while len(done) < len(batch):
        sched = h.connector.sched if h.connector is not None else None
        running = {r.request_id.split("-")[0] for r in h.scheduler.running}
        if sched is not None and any(j.pending for j in sched.jobs.values()) and running & {"a1", "a2"}:
            scoring_steps_with_a += 1
        h.step_batch(batch, done)
    h.drain()
    return {"prefixes": {"a": a, "b": b}, "suffixes": [list(s) for s in SUFFIXES], "batch": batch,
            "warm": warm, "requests": [done[r] for r in batch], "scoring_steps_with_a": scoring_steps_with_a,
            "kvzip": h.kvzip_state(), "pool": h.pool_state()}


def stores(h: Harness) -> dict:
    """Requests on two compacted prefixes (A: job 0, B: job 1) and a plain request decode in the same steps."""
    a, b = prefix_ids(0), prefix_ids(1)
    for p in (a, b):
        h.run("w", p + list(SUFFIXES[0]))
        h.run("w", p + list(SUFFIXES[1]))
        h.drain()  # compacted
    batch = {"a1": a + list(SUFFIXES[2]), "b1": b + list(SUFFIXES[3]), "a2": a + list(SUFFIXES[4]),
             "p1": prefix_ids(7)[:40]}
    for rid, ids in batch.items():
        h.add(rid, ids, max_tokens=MAX_TOKENS)
    done: dict = {}
    steps_on_both = 0
    while len(done) < len(batch):
        on = {r.request_id.split("-")[0][0] for r in h.scheduler.running
              if r.num_computed_tokens >= r.num_prompt_tokens}  # decoding: a..., b..., p...
        steps_on_both += {"a", "b", "p"} <= on
        h.step_batch(batch, done)
    h.drain()
    return {"prefixes": {"a": a, "b": b}, "suffixes": [list(s) for s in SUFFIXES], "batch": batch,
            "requests": [done[r] for r in batch], "steps_on_both": steps_on_both, "kvzip": h.kvzip_state(),
            "pool": h.pool_state()}


CROWD = 33
"""Requests on one compacted prefix in `crowd` (its test forces the cascade with `KVZIP_CPU_CASCADE=always`: the test
prefix's runs are shorter than `cpu_cascade.CASCADE_MIN_RUN`)."""


def crowd(h: Harness) -> dict:
    """Enough requests on one compacted prefix (A: job 0) for the cascade, a late request on it that prefills while
    they decode, and a plain request. Counts the steps whose plan on the worker (in this process) took the cascade,
    and those that also had rows for vLLM's kernel."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    a = prefix_ids(0)
    h.run("w", a + list(SUFFIXES[0]))
    h.run("w", a + list(SUFFIXES[1]))
    h.drain()  # compacted
    suffixes = {f"c{i}": [100 + i, 300 + (7 * i) % 100, 60 + i] for i in range(CROWD)}
    suffixes["z1"] = [41, 42, 43, 44]
    batch = {rid: a + s for rid, s in suffixes.items() if rid != "z1"}
    batch["p1"] = prefix_ids(7)[:40]
    for rid, ids in batch.items():
        h.add(rid, ids)
    worker = get_kv_transfer_group().worker
    done: dict = {}
    cascade_steps = mixed_steps = 0
    while len(done) < len(batch):
        if "z1" not in batch and len(done) == 0 and cascade_steps >= 2:
            batch["z1"] = a + suffixes["z1"]
            h.add("z1", batch["z1"])
        worker._paged_plan = None
        h.step_batch(batch, done)
        plan = worker._paged_plan[1] if worker._paged_plan is not None else None
        if plan is not None and plan.cascade:
            cascade_steps += 1
            mixed_steps += plan.kernel is not None
    h.drain()
    return {"prefixes": {"a": a}, "suffixes": suffixes, "requests": [done[r] for r in batch],
            "cascade_steps": cascade_steps, "mixed_steps": mixed_steps, "kvzip": h.kvzip_state(),
            "pool": h.pool_state()}


def sliced(h: Harness) -> dict:
    """A job scores while client requests decode, and a new client request arrives mid-job; then a second job
    scores with no client at all. Records every step's scheduled tokens (scoring vs client, and which client
    requests prefilled in it)."""
    from kvzip_plugin.integrations.vllm.scheduler import is_scoring_request

    prefix = prefix_ids(0)
    steps: list[dict] = []
    schedule = h.scheduler.schedule

    def recording_schedule(*args, **kwargs):
        prefilling = {r.request_id for r in h.scheduler.running if r.num_computed_tokens < r.num_prompt_tokens}
        prefilling |= {r.request_id for r in h.scheduler.waiting}
        out = schedule(*args, **kwargs)
        n = out.num_scheduled_tokens
        steps.append({"scoring": sum(v for k, v in n.items() if is_scoring_request(k)),
                      "clients": {k.split("-")[0]: v for k, v in n.items() if not is_scoring_request(k)},
                      "client_prefill": sorted(k.split("-")[0] for k in n if not is_scoring_request(k)
                                               and (k in prefilling or n[k] > 1))})
        return out

    h.scheduler.schedule = recording_schedule
    h.run("r0", prefix + list(SUFFIXES[0]))  # caches the prefix
    h.add("r1", prefix + list(SUFFIXES[1]), max_tokens=60)  # the second hit queues the job
    h.add("c1", prefix_ids(5)[:40], max_tokens=60)
    late_added = False
    for _ in range(400):
        sched = h.connector.sched
        scoring = any(j.pending for j in sched.jobs.values())
        if scoring and not late_added and sum(st["scoring"] for st in steps) > 0:
            h.add("c2", prefix_ids(6)[:72], max_tokens=4)  # arrives mid-job: its prefill goes first
            late_added = True
        h.step()
        if not h.scheduler.has_requests():
            break
    h.drain()
    # a second job with no client beside it: its scoring prefill goes in idle slices, not whole
    alone_from = len(steps)
    other = prefix_ids(1)
    h.run("a0", other + list(SUFFIXES[0]))  # caches the prefix
    h.add("a1", other + list(SUFFIXES[1]), max_tokens=1)  # the second hit queues the job, then ends
    h.drain(400)
    gate = h.connector.sched.gate
    return {"steps": steps[:alone_from], "alone_steps": steps[alone_from:], "late_added": late_added,
            "kvzip": h.kvzip_state(), "pool": h.pool_state(),
            "gate": {"held_steps": gate.held_steps, "forced": gate.forced, "idle_tokens": gate.idle_tokens}}


SCENARIOS = {"sliced": sliced, "mixed": mixed, "stores": stores, "sequential": sequential, "salts": salts,
             "churn": churn,
             "cancel": cancel, "repeat": repeat, "crowd": crowd}
MAX_NUM_SEQS = {"crowd": CROWD + 4}  # the others: 4


def main(model_dir: str, scenario: str) -> dict:
    llm = make_llm(model_dir, MAX_NUM_SEQS.get(scenario, 4))
    result = SCENARIOS[scenario](Harness(llm))
    result["stats"] = os.environ.get("KVZIP_DUMP_DIR")
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1], sys.argv[2])), flush=True)
