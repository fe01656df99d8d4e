# SPDX-License-Identifier: Apache-2.0
"""Multi-tenant serving on vLLM or SGLang: `--kv-compression none` vs `kvzip`, same model, load and seed.

Starts the engine's server twice (`--engine vllm`: `vllm serve`; `--engine sglang`:
`python -m sglang.launch_server`), one mode after the other, each in its own process group, stopped
before the next starts, with a fixed KV pool (vLLM `--num-gpu-blocks-override`, SGLang
`--max-total-tokens`: both modes get exactly the same pool) and runs three phases of
`kvzip_plugin.eval.loadgen` on each:

1. `warm`: T tenants x Q questions, concurrency T (every tenant's long system prompt is prefilled,
   then hit Q-1 times: KVzip's trigger sees repeated prefixes). Then up to `--settle` seconds for
   queued / running KVzip jobs to finish.
2. `steady`: the same T x Q requests again, concurrency T. Decode ms/token (client streams, p50;
   vLLM's inter-token latency histogram; KVzip's own compressed / full decode-step histograms) and
   the KV blocks held while they run.
3. `burst`: T x B requests sent at once (`--burst-per-tenant B`), longer replies. With the pool
   sized to hold the T full prefixes plus `--extra-blocks` blocks, the pool is what limits how many
   requests run together: the peak of `vllm:num_requests_running` (polled from /metrics), the
   waiting peak and the preemptions are "requests that fit in a fixed KV pool".

KV blocks in use are the usage gauge's peak (`vllm:kv_cache_usage_perc`, `sglang:token_usage`) x pool
blocks: both engines count blocks of idle cached prefixes as free, so this is what *running* requests
hold; `<engine>:kvzip_blocks_saved` (what the live compacted prefixes save) is reported next to it. On
SGLang a block is a page of `--page-size` tokens (1 by default: blocks are tokens). The report gives
every number for both modes and their ratio kvzip / none. It makes no claim about what a number should
be: with a plugin that does not compress, kvzip / none is ~1 and the kvzip_* series are absent or zero.

Run (CPU, the offline demo model; ~6 min per engine on 2 cores):

    PYTHONPATH=. python benchmarks/bench_multitenant.py --out benchmarks/results/vllm-multitenant-cpu.json
    PYTHONPATH=. python benchmarks/bench_multitenant.py --engine sglang \\
        --out benchmarks/results/sglang-multitenant-cpu.json

On a CPU, SGLang 0.5.23 starts only with the two test-harness shims of tests/integrations/sglang/shims
(torchvision operator schemas, pure-torch `sgl_kernel` CPU ops; no CPU wheel exists): the benchmark puts
them on the servers' PYTHONPATH with `--device cpu`, as the CI tests do, and never with `--device cuda`.

A GPU (vLLM 0.33 / SGLang 0.5.23 CUDA): `--device cuda` drops the CPU flags; arguments after `--` go to
both servers:

    python benchmarks/bench_multitenant.py --device cuda --model /models/Llama-3.1-8B-Instruct \\
        --num-blocks 2000 -- --gpu-memory-utilization 0.8

Writes the JSON and `<out>.md` next to it; `--replot X.json` re-makes the Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run_info import cpu_name, git_commit  # noqa: E402  (benchmarks/, the script's folder)

from kvzip_plugin.eval.loadgen import (  # noqa: E402
    LoadConfig,
    build_workload,
    run_load,
    scrape,
    summarize,
    wait_healthy,
    wait_kvzip_idle,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODES = ("none", "kvzip")
ENGINES = ("vllm", "sglang")
SERVED_NAME = "bench-model"
SGLANG_SHIMS = REPO / "tests" / "integrations" / "sglang" / "shims"


# ---------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------


def launcher(python: str) -> list[str]:
    """How to start `vllm serve` with `python`: vllm-cpu 0.32's launcher module (its `vllm` console
    script is broken), else `python -m vllm.entrypoints.cli.main serve`."""
    probe = ("import importlib.util\nfrom pathlib import Path\nspec = importlib.util.find_spec('vllm')\n"
             "root = Path(spec.origin).parent\n"
             "print((root / 'entrypoints/launchers/api_server/entry.py').is_file())")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    if out == "True":
        return [python, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model"]
    return [python, "-m", "vllm.entrypoints.cli.main", "serve"]


def server_versions(python: str) -> dict[str, str | None]:
    code = ("import json\nfrom importlib.metadata import version, PackageNotFoundError\nout = {}\n"
            "for d in ('vllm', 'vllm-cpu', 'sglang', 'torch', 'transformers', 'kvzip-plugin'):\n"
            "    try: out[d] = version(d)\n    except PackageNotFoundError: out[d] = None\nprint(json.dumps(out))")
    try:
        return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)
    except (subprocess.CalledProcessError, json.JSONDecodeError):
        return {}


class Server:
    """An engine's server in its own process group, logs to a file; a context manager that always stops it."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, url: str, startup_timeout: float) -> None:
        self.cmd, self.env, self.log, self.url, self.startup_timeout = cmd, env, log, url, startup_timeout
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def __enter__(self) -> Server:
        try:  # nothing may already answer on our port: the load would go to it
            wait_healthy(self.url, timeout=0, interval=0)
            raise RuntimeError(f"something already serves {self.url}; pick another --port")
        except TimeoutError:
            pass
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        try:
            self.startup_s = wait_healthy(self.url, self.startup_timeout, alive=lambda: self.proc.poll() is None)
        except (RuntimeError, TimeoutError) as err:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
            self.stop()
            raise RuntimeError(f"{err}; last lines of {self.log}:\n{tail}") from None
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # children (EngineCore, worker) share the group; make sure none is left
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None

    def __exit__(self, *exc: object) -> None:
        self.stop()


def kvzip_flags(args: argparse.Namespace, mode: str) -> list[str]:
    """The plugin's flags (the same on both engines)."""
    if mode != "kvzip":
        return []
    flags = ["--kv-compression-min-prefix-tokens", str(args.min_prefix_tokens), "--kv-compression-min-hits",
             str(args.min_hits)]
    return flags + (["--kv-compression-ratio", str(args.ratio)] if args.ratio is not None else [])


def server_command(args: argparse.Namespace, mode: str, num_blocks: int) -> list[str]:
    if args.engine == "sglang":
        return sglang_command(args, mode, num_blocks)
    cmd = [*launcher(args.python), str(args.model), "--served-model-name", SERVED_NAME, "--host", "127.0.0.1",
           "--port", str(args.port), "--max-model-len", str(args.max_model_len), "--block-size", str(args.block_size),
           "--enable-prefix-caching", "--num-gpu-blocks-override", str(num_blocks),
           "--max-num-seqs", str(args.max_num_seqs), "--seed", str(args.seed), "--kv-compression", mode]
    if args.device == "cpu":
        cmd += ["--dtype", "float32", "--enforce-eager"]
    return cmd + kvzip_flags(args, mode) + list(args.server_args)


def sglang_command(args: argparse.Namespace, mode: str, num_blocks: int) -> list[str]:
    """`python -m sglang.launch_server` with a pool of `num_blocks` pages of `--block-size` tokens."""
    cmd = [args.python, "-m", "sglang.launch_server", "--model-path", str(args.model), "--served-model-name",
           SERVED_NAME, "--host", "127.0.0.1", "--port", str(args.port), "--context-length", str(args.max_model_len),
           "--page-size", str(args.block_size), "--max-total-tokens", str(num_blocks * args.block_size),
           "--max-running-requests", str(args.max_num_seqs), "--random-seed", str(args.seed), "--enable-metrics",
           "--kv-compression", mode]
    if args.device == "cpu":
        cmd += ["--device", "cpu", "--attention-backend", "torch_native", "--disable-overlap-schedule",
                "--dtype", "float32"]
    return cmd + kvzip_flags(args, mode) + list(args.server_args)


def server_env(args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVZIP_KV_COMPRESSION")}
    env["HF_HUB_OFFLINE"] = "1"
    paths = [str(REPO)]
    if args.device == "cpu" and args.engine == "vllm":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.cpu_kvcache_gib)
    if args.device == "cpu" and args.engine == "sglang":
        # no sgl_kernel / torchvision CPU wheel: the CI's test-harness shims (see the module docstring)
        prefix = subprocess.run([args.python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                                check=True).stdout.strip()
        extras = Path(prefix) / "sglang-cpu-extras"  # torchvision, put there by scripts/setup_sglang.sh
        paths = [str(SGLANG_SHIMS), str(extras), *paths]
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (*paths, env.get("PYTHONPATH")) if p)
    return env


# ---------------------------------------------------------------------------------------------
# sizing
# ---------------------------------------------------------------------------------------------


def prompt_tokens(model: str, tenants: int, facts: int, seed: int) -> list[int]:
    """Each tenant's rendered prompt length (system + first question + generation prompt)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    reqs = build_workload(tenants, 1, facts, seed)
    return [len(tok.apply_chat_template(r.messages(), tokenize=True, add_generation_prompt=True, return_dict=False))
            for r in reqs]


def pool_blocks(args: argparse.Namespace, lengths: list[int]) -> tuple[int, dict[str, Any]]:
    """The fixed pool: every tenant's full prompt blocks plus `--extra-blocks`, and at least one
    `--max-model-len` request (vLLM refuses to start otherwise). Blocks of `--block-size` tokens
    (vLLM blocks, SGLang pages)."""
    prefix_blocks = sum(math.ceil(n / args.block_size) for n in lengths)
    extra = args.extra_blocks if args.extra_blocks is not None else 3 * args.tenants * 32 // args.block_size
    blocks = args.num_blocks or max(prefix_blocks + extra, math.ceil(args.max_model_len / args.block_size) + 1)
    return blocks, {"prompt_tokens_per_tenant": lengths, "prefix_blocks_all_tenants": prefix_blocks,
                    "extra_blocks": extra, "num_blocks": blocks, "explicit": bool(args.num_blocks)}


# ---------------------------------------------------------------------------------------------
# one mode
# ---------------------------------------------------------------------------------------------


def _phase(cfg: LoadConfig, requests=None) -> dict[str, Any]:
    report = run_load(cfg, requests)
    return {"wall_s": report.wall_s, "client": report.client_summary(), "metrics": report.metrics,
            "scrapes": report.scrapes, "replies": [[r.tenant, r.question, r.text] for r in report.results]}


def run_mode(args: argparse.Namespace, mode: str, num_blocks: int, log_dir: Path) -> dict[str, Any]:
    url = f"http://127.0.0.1:{args.port}"
    cmd = server_command(args, mode, num_blocks)
    log = log_dir / f"server-{mode}.log"
    print(f"== {mode}: {shlex.join(cmd)}\n   log: {log}", flush=True)
    base = LoadConfig(url=url, model=SERVED_NAME, tenants=args.tenants, questions=args.questions,
                      concurrency=args.tenants, max_tokens=args.max_tokens, facts=args.facts, seed=args.seed,
                      ignore_eos=True, timeout=args.request_timeout, metrics_interval=args.metrics_interval,
                      metrics_prefix=f"{args.engine}:")
    out: dict[str, Any] = {"mode": mode, "command": cmd, "log": str(log)}
    with Server(cmd, server_env(args), log, url, args.startup_timeout) as server:
        out["startup_s"] = server.startup_s
        print(f"   healthy after {server.startup_s:.0f} s", flush=True)
        start = scrape(url)
        out["warm"] = _phase(base)
        print(f"   warm: {out['warm']['wall_s']:.1f} s", flush=True)
        t = time.monotonic()
        wait_kvzip_idle(url, args.settle, prefix=f"{args.engine}:")
        out["settle_s"] = time.monotonic() - t
        out["steady"] = _phase(base)
        print(f"   steady: {out['steady']['wall_s']:.1f} s", flush=True)
        burst_cfg = replace(base, questions=args.burst_per_tenant, concurrency=args.tenants * args.burst_per_tenant,
                            max_tokens=args.burst_max_tokens)
        out["burst"] = _phase(burst_cfg)
        print(f"   burst: {out['burst']['wall_s']:.1f} s", flush=True)
        out["totals"] = summarize(start, scrape(url), prefix=f"{args.engine}:")  # whole run: jobs, overhead, savings
    return out


# ---------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------


def _get(d: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


ROWS: tuple[tuple[str, str, str], ...] = (
    # (label, path in a run, format)
    ("server start-up (s)", "startup_s", ".0f"),
    ("pool: KV blocks (fixed)", "steady.metrics.engine.num_gpu_blocks", "d"),
    ("steady: KV blocks held by running requests (peak)", "steady.metrics.engine.kv_blocks_in_use_peak", "d"),
    ("burst: KV blocks held by running requests (peak)", "burst.metrics.engine.kv_blocks_in_use_peak", "d"),
    ("burst: requests running together (peak)", "burst.metrics.engine.num_requests_running_peak", "d"),
    ("burst: requests waiting (peak)", "burst.metrics.engine.num_requests_waiting_peak", "d"),
    ("burst: preemptions", "burst.metrics.engine.num_preemptions", "d"),
    ("burst: wall (s)", "burst.wall_s", ".1f"),
    ("burst: output tokens/s", "burst.client.output_tokens_per_s", ".1f"),
    ("steady: decode ms/token, client p50", "steady.client.decode_ms_per_token_p50", ".2f"),
    ("steady: inter-token latency ms, engine mean", "steady.metrics.engine.inter_token_latency_ms", ".2f"),
    ("steady: TTFT ms, client p50", "steady.client.ttft_ms_later_questions_p50", ".0f"),
    ("warm: wall (s) (prefill + compression jobs)", "warm.wall_s", ".1f"),
    ("warm: TTFT ms of each tenant's first question, p50", "warm.client.ttft_ms_first_question_p50", ".0f"),
    ("prefix cache hit rate (steady)", "steady.metrics.engine.prefix_cache_hit_rate", ".3f"),
    ("answers with the expected code (steady)", "steady.client.correct", "d"),
    ("kvzip: prefixes compressed", "totals.kvzip.prefixes_compressed", "d"),
    ("kvzip: blocks saved (after the run)", "totals.kvzip.blocks_saved", "d"),
    ("kvzip: blocks saved (peak during burst)", "burst.metrics.kvzip.blocks_saved_peak", "d"),
    ("kvzip: achieved ratio (mean)", "totals.kvzip.achieved_ratio_mean", ".3f"),
    ("kvzip: jobs committed", "totals.kvzip.jobs.committed", "d"),
    ("kvzip: jobs failed", "totals.kvzip.jobs.failed", "d"),
    ("kvzip: scoring s per prefix (mean)", "totals.kvzip.scoring_seconds_mean", ".2f"),
    ("kvzip: scoring / prefill (mean)", "totals.kvzip.scoring_to_prefill_mean", ".2f"),
    ("kvzip: requests on a compressed prefix", "totals.kvzip.compressed_prefix_hits", "d"),
    ("kvzip: decode ms/step on compressed prefixes", "steady.metrics.kvzip.decode_ms_per_token.compressed", ".2f"),
    ("kvzip: decode ms/step on full prefixes", "steady.metrics.kvzip.decode_ms_per_token.full", ".2f"),
)

# rows whose kvzip / none ratio is meaningful
RATIO_ROWS = {"steady.metrics.engine.kv_blocks_in_use_peak", "burst.metrics.engine.kv_blocks_in_use_peak",
              "burst.metrics.engine.num_requests_running_peak", "burst.wall_s", "burst.client.output_tokens_per_s",
              "steady.client.decode_ms_per_token_p50", "steady.metrics.engine.inter_token_latency_ms",
              "steady.client.ttft_ms_later_questions_p50", "warm.wall_s", "warm.client.ttft_ms_first_question_p50"}


def same_replies(runs: dict[str, dict[str, Any]], phase: str = "steady") -> int | None:
    """Replies of `phase` identical in both modes (greedy decoding: a compressed prefix that changes
    nothing the model attends to gives the same text)."""
    a, b = _get(runs.get("none", {}), f"{phase}.replies"), _get(runs.get("kvzip", {}), f"{phase}.replies")
    if not a or not b:
        return None
    full = {(t, q): text for t, q, text in a}
    return sum(full.get((t, q)) == text for t, q, text in b)


def comparison(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for label, path, fmt in ROWS:
        a, b = _get(runs.get("none", {}), path), _get(runs.get("kvzip", {}), path)
        ratio = b / a if path in RATIO_ROWS and isinstance(a, (int, float)) and isinstance(b, (int, float)) and a \
            else None
        rows.append({"metric": label, "path": path, "none": a, "kvzip": b, "kvzip_over_none": ratio, "fmt": fmt})
    same = same_replies(runs)
    if same is not None:
        n = len(_get(runs["kvzip"], "steady.replies"))
        rows.append({"metric": f"steady: replies identical to none's (of {n})", "path": "steady.replies",
                     "none": n, "kvzip": same, "kvzip_over_none": same / n if n else None, "fmt": "d"})
    return rows


def _fmt(x: Any, fmt: str) -> str:
    if x is None:
        return "n/a"
    if fmt == "d" and isinstance(x, (int, float)):
        return str(int(round(x)))
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)


def markdown(doc: dict[str, Any]) -> str:
    m, s = doc["meta"], doc["settings"]
    engine = {"vllm": "vLLM", "sglang": "SGLang"}[s.get("engine", "vllm")]
    pool_flag = "--num-gpu-blocks-override" if engine == "vLLM" else "--max-total-tokens, --page-size"
    usage, running = (("`vllm:kv_cache_usage_perc`", "`vllm:num_requests_running`") if engine == "vLLM"
                      else ("`sglang:token_usage`", "`sglang:num_running_reqs`"))
    lines = [
        f"# {engine} multi-tenant: `--kv-compression none` vs `kvzip`",
        "",
        f"- model: `{m['model']}`; device: {m['device']} ({m['hardware']['cpu']}, {m['hardware']['logical_cpus']} "
        f"logical CPUs, load average at start {m['hardware']['load_average_at_start']})",
        f"- versions: {', '.join(f'{k} {v}' for k, v in m['server_versions'].items() if v)}; commit "
        f"{m['git_commit']}",
        f"- load: {s['tenants']} tenants x {s['questions']} questions (warm, steady; concurrency {s['tenants']}, "
        f"max_tokens {s['max_tokens']}, ignore_eos), burst {s['tenants']} x {s['burst_per_tenant']} at once "
        f"(max_tokens {s['burst_max_tokens']}); {s['facts']} facts per tenant "
        f"(prompts {s['pool']['prompt_tokens_per_tenant']} tokens); seed {s['seed']}",
        f"- pool: {s['pool']['num_blocks']} blocks of {s['block_size']} tokens (`{pool_flag}`; "
        f"all tenants' prompts take {s['pool']['prefix_blocks_all_tenants']} blocks), max_num_seqs "
        f"{s['max_num_seqs']}; kvzip: min prefix {s['min_prefix_tokens']} tokens, min hits {s['min_hits']}, "
        f"ratio {s['ratio'] if s['ratio'] is not None else 'default'}",
        f"- command: `{m['command']}`",
        "",
        "| metric | none | kvzip | kvzip / none |",
        "|---|---:|---:|---:|",
    ]
    for r in doc["comparison"]:
        lines.append(f"| {r['metric']} | {_fmt(r['none'], r['fmt'])} | {_fmt(r['kvzip'], r['fmt'])} | "
                     f"{_fmt(r['kvzip_over_none'], '.2f')} |")
    lines += ["", f"KV blocks held = peak {usage} x pool blocks (idle cached prefix blocks count as free in "
              f"{engine}'s gauge); requests running together = peak of {running} polled every "
              f"{s['metrics_interval']} s. Notes: " + "; ".join(doc.get("notes", [])), ""]
    return "\n".join(lines)


def meta(args: argparse.Namespace) -> dict[str, Any]:
    cpu = cpu_name()
    return {
        "model": str(args.model),
        "device": args.device,
        "hardware": {"cpu": cpu, "logical_cpus": os.cpu_count(),
                     "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg")
                     else None},
        "server_versions": server_versions(args.python),
        "python": platform.python_version(),
        "command": "python " + shlex.join(sys.argv),
        "git_commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def notes(runs: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    kv = runs.get("kvzip")
    if kv is not None:
        k = _get(kv, "totals.kvzip") or {}
        if not k.get("exported"):
            out.append("the kvzip server exported no kvzip_* series: the connector does not compress yet, "
                       "so kvzip / none measures the connector's overhead only")
        elif not k.get("prefixes_compressed"):
            out.append("no prefix was compressed during the kvzip run (see its jobs and fallbacks)")
    for mode, run in runs.items():
        for phase in ("warm", "steady", "burst"):
            errors = _get(run, f"{phase}.client.errors")
            if errors:
                out.append(f"{mode} {phase}: {errors} requests failed ({_get(run, f'{phase}.client.first_error')})")
    return out or ["none"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Arguments after `--` are passed to both servers.")
    p.add_argument("--model", default=None, help="local model folder (default: the offline demo model)")
    p.add_argument("--engine", choices=ENGINES, default="vllm")
    p.add_argument("--python", default=sys.executable, help="the Python with the engine that runs the servers")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu adds --dtype float32 --enforce-eager and VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--questions", type=int, default=4, help="questions per tenant in the warm and steady phases")
    p.add_argument("--burst-per-tenant", type=int, default=8, help="requests per tenant in the burst")
    p.add_argument("--facts", type=int, default=64, help="facts per tenant document (64: ~1,100 prompt tokens)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--burst-max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV block: vLLM --block-size (default 32), SGLang --page-size (default 1)")
    p.add_argument("--max-model-len", type=int, default=4096,
                   help="must hold KVzip's scoring input (about twice the prefix: the prefix, then its repeat)")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV pool in blocks (default: all tenants' prompt blocks + --extra-blocks)")
    p.add_argument("--extra-blocks", type=int, default=None,
                   help="default 3 x tenants blocks of 32 tokens (the same tokens on both engines)")
    p.add_argument("--cpu-kvcache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE on cpu (whole GiB)")
    p.add_argument("--ratio", type=float, default=None, help="--kv-compression-ratio (default: the plugin's)")
    p.add_argument("--min-prefix-tokens", type=int, default=256)
    p.add_argument("--min-hits", type=int, default=2)
    p.add_argument("--settle", type=float, default=120.0, help="max seconds to wait for KVzip jobs after warm-up")
    p.add_argument("--metrics-interval", type=float, default=0.2)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--log-dir", type=Path, default=None, help="server logs (default: a new temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="default results/<engine>-multitenant.json")
    p.add_argument("--replot", type=Path, default=None, help="re-make the Markdown of an existing JSON")
    args = p.parse_args(argv)
    args.server_args = server_args
    if args.block_size is None:
        args.block_size = 32 if args.engine == "vllm" else 1
    if args.out is None:
        args.out = RESULTS_DIR / f"{args.engine}-multitenant.json"

    if args.replot:
        doc = json.loads(args.replot.read_text())
        args.replot.with_suffix(".md").write_text(markdown(doc))
        print(f"wrote {args.replot.with_suffix('.md')}")
        return 0
    if args.model is None:
        from kvzip_plugin.hf.models import demo_model_dir

        args.model = str(demo_model_dir())
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix=f"kvzip-bench-{args.engine}-"))
    lengths = prompt_tokens(args.model, args.tenants, args.facts, args.seed)
    num_blocks, pool = pool_blocks(args, lengths)
    print(f"prompts {lengths} tokens; pool {num_blocks} blocks of {args.block_size}", flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("replot", "out", "log_dir", "python")}
    settings["pool"] = pool
    doc: dict[str, Any] = {"benchmark": f"{args.engine}-multitenant", "meta": meta(args), "settings": settings,
                           "runs": {}}

    def _term(signum, frame):  # make SIGTERM run the servers' clean-up like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    t0 = time.monotonic()
    for mode in args.modes:
        doc["runs"][mode] = run_mode(args, mode, num_blocks, log_dir)
    doc["meta"]["wall_s"] = time.monotonic() - t0
    doc["comparison"] = comparison(doc["runs"])
    doc["notes"] = notes(doc["runs"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md = markdown(doc)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} in {doc['meta']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
