#!/usr/bin/env bash
# vLLM's own prefix-caching tests with KVzip bound to every KVCacheManager they build (issue 16).
#
# Takes the tests from the sdist of the installed vLLM (the CPU CI's 0.32.0), sha256-checked against the
# package index, and runs them three times with the venv's pytest, offline (HF_HUB_OFFLINE=1):
#   plain      as vLLM ships them;
#   kvzip      with tests/integrations/vllm/upstream_bind.py loaded (-p upstream_bind): every KVCacheManager
#              the tests build gets its own KVzip SchedulerState, bound as KVzipConnector.bind_kv_cache_manager
#              binds it in an engine (get_computed_blocks / allocate_slots / record_prefix_cache_stats
#              wrapped on the instance, each lookup observed as the Scheduler's connector call does) on the
#              managers whose KV-cache config the connector accepts; the others count as refused, as the
#              connector disables itself there;
#   kvzip_all  the same plugin binding every manager, also those the connector refuses (hybrid groups,
#              sliding window, Mamba): a stress run of bind() on configs an engine never hands it.
# Only tests/v1/core/ is extracted (plus the two helper modules it imports from tests/v1/kv_connector/unit/,
# the package __init__ files and the sdist's pyproject.toml for pytest's marker list). The files run are
# the ones of tests/v1/core/ that need no hub model; the 8 cases of test_prefix_caching.py that build a
# VllmConfig for facebook/opt-125m are deselected (listed in the JSON). test_scheduler.py and the other
# Scheduler tests build their engines from hub models and are left out.
#
# Writes benchmarks/results/vllm-upstream-tests.json and .md. Exits non-zero when the kvzip run bound no
# manager, when any test's outcome differs between plain and kvzip, when a kvzip_all difference is not
# explained by bind() failing on a config the connector refuses, or when pytest itself errors.
#
# The sdist is found through the package index's JSON API (PEP 691, the index pip uses: PIP_INDEX_URL or
# pypi.org) and downloaded once to ${KVZIP_CACHE_DIR:-~/.cache/kvzip-plugin}/vllm-src/. Not `pip download
# --no-binary :all:`: pip builds an sdist's metadata before saving it, which for vLLM installs its build
# requirements (torch==2.13.0, cmake, ...) in an isolated environment. VLLM_SDIST=/path/vllm-X.tar.gz uses
# a local copy (its sha256 is recorded, and checked against the index when the index answers).
#
#   bash scripts/vllm_upstream_tests.sh                 # ~1 min on 2 cores after the first download (45 MB)
#   PYTHON=/path/python bash scripts/vllm_upstream_tests.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
export KVZIP_UPSTREAM_ROOT="$ROOT"
export KVZIP_UPSTREAM_CACHE="${KVZIP_CACHE_DIR:-$HOME/.cache/kvzip-plugin}/vllm-src"
exec "$PY" - "$@" <<'PY'
import datetime
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(os.environ["KVZIP_UPSTREAM_ROOT"])
CACHE = Path(os.environ["KVZIP_UPSTREAM_CACHE"])
PLUGIN = ROOT / "tests/integrations/vllm/upstream_bind.py"
RESULTS = ROOT / "benchmarks/results"
FILES = [  # tests/v1/core/ files that run offline (no hub model) and exercise prefix caching / KVCacheManager
    "tests/v1/core/test_prefix_caching.py",
    "tests/v1/core/prefix_cache/test_partial_prefix_cache_hits.py",
    "tests/v1/core/prefix_cache/test_partial_prefix_cache_primitives.py",
    "tests/v1/core/prefix_cache/test_mamba_eagle_resume_checkpoint.py",
    "tests/v1/core/test_contiguous_kv_packing.py",
    "tests/v1/core/test_mamba_align_chunk_split.py",
    "tests/v1/core/test_single_type_kv_cache_manager.py",
]
DESELECT = {  # node id prefix -> why
    "tests/v1/core/test_prefix_caching.py::test_nixl_hisparse_full_block_import_keeps_a_writable_tail":
        "create_vllm_config() resolves the hub model facebook/opt-125m (no hub here)",
}
HELPERS = [  # what tests/v1/core imports from the rest of the sdist's tests/ tree
    "pyproject.toml", "tests/__init__.py", "tests/v1/__init__.py", "tests/v1/kv_connector/__init__.py",
    "tests/v1/kv_connector/unit/__init__.py", "tests/v1/kv_connector/unit/utils.py",
]
RUNS = {  # name -> (extra pytest args, extra env)
    "plain": ([], {}),
    "kvzip": (["-p", "upstream_bind"], {"KVZIP_UPSTREAM_BIND_MODE": "connector"}),
    "kvzip_all": (["-p", "upstream_bind"], {"KVZIP_UPSTREAM_BIND_MODE": "all"}),
}


def log(msg: str) -> None:
    print(f"vllm_upstream_tests: {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def index_entry(version: str) -> dict | None:
    """The sdist's file entry in the package index (PEP 691 JSON): url and sha256."""
    base = (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/")
    req = urllib.request.Request(f"{base}/vllm/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            files = json.load(r)["files"]
    except Exception as exc:  # offline: a cached or given sdist still runs (its hash is recorded unchecked)
        log(f"package index not reachable ({type(exc).__name__}: {exc})")
        return None
    for f in files:
        if f["filename"] == f"vllm-{version}.tar.gz":
            return {"url": f["url"], "sha256": f["hashes"]["sha256"], "index": base}
    raise SystemExit(f"vllm_upstream_tests: no sdist vllm-{version}.tar.gz in {base}/vllm/")


def get_sdist(version: str) -> tuple[Path, dict]:
    CACHE.mkdir(parents=True, exist_ok=True)
    entry = index_entry(version)
    path = Path(os.environ["VLLM_SDIST"]) if os.environ.get("VLLM_SDIST") else CACHE / f"vllm-{version}.tar.gz"
    digest = sha256(path) if path.exists() else None
    if digest is None or (entry and digest != entry["sha256"]):
        if entry is None or os.environ.get("VLLM_SDIST"):
            raise SystemExit(f"vllm_upstream_tests: {path} missing or not the index's sdist")
        log(f"downloading {entry['url']}")
        part = path.with_suffix(".part")
        with urllib.request.urlopen(entry["url"], timeout=600) as r, open(part, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        if sha256(part) != entry["sha256"]:
            part.unlink()
            raise SystemExit("vllm_upstream_tests: downloaded sdist does not match the index's sha256")
        part.rename(path)
        digest = entry["sha256"]  # the download's, checked just above
    return path, {"file": path.name, "sha256": digest, "size": path.stat().st_size,
                  "url": entry["url"] if entry else None,
                  "sha256_checked_against_index": bool(entry and entry["sha256"] == digest)}


def extract(sdist: Path, version: str) -> tuple[Path, list[str]]:
    dest = CACHE / f"vllm-{version}-tests"
    if dest.exists():
        subprocess.run(["rm", "-rf", str(dest)], check=True)
    top, taken = f"vllm-{version}/", []
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            rel = m.name[len(top):] if m.name.startswith(top) else None
            if rel is None or not m.isfile() or not (rel.startswith("tests/v1/core/") or rel in HELPERS):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(m).read())
            taken.append(rel)
    missing = [f for f in FILES + HELPERS if f not in taken]
    if missing:
        raise SystemExit(f"vllm_upstream_tests: not in the sdist: {missing}")
    return dest, sorted(taken)


def outcomes(xml: Path) -> dict[str, str]:
    res = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        tags = {c.tag for c in case}
        kind = ("error" if "error" in tags else "failed" if "failure" in tags
                else "skipped" if "skipped" in tags else "passed")
        res[f"{case.get('classname')}::{case.get('name')}"] = kind
    return res


def run(name: str, src: Path, work: Path) -> dict:
    extra, extra_env = RUNS[name]
    xml, report = work / f"{name}.xml", work / f"{name}-bind.json"
    for p in (xml, report):
        p.unlink(missing_ok=True)
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", f"--junitxml={xml}", *extra]
    args += [a for d in DESELECT for a in ("--deselect", d)] + FILES
    env_shown = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "PYTHONPATH": str(PLUGIN.parent), **extra_env}
    env = {**os.environ, **env_shown}
    if extra:
        env["KVZIP_UPSTREAM_BIND_REPORT"] = str(report)
    command = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_shown.items()) + " python " + shlex.join(args)
    log(f"run {name}: {command}")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, *args], cwd=src, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    log(f"run {name}: rc {proc.returncode}, {wall:.1f} s: {tail}")
    res = outcomes(xml) if xml.exists() else {}
    counts = Counter(res.values())
    out = {"command": f"cd <sdist tests> && {command}", "rc": proc.returncode, "wall_s": round(wall, 1),
           "summary": tail, **{k: counts.get(k, 0) for k in ("passed", "failed", "skipped", "error")},
           "failing": sorted(t for t, o in res.items() if o in ("failed", "error")),
           "skipped_ids": sorted(t for t, o in res.items() if o == "skipped")}
    if extra:
        out["bind"] = json.loads(report.read_text()) if report.exists() else None
    return out, res


def junit_id(node: str) -> str:
    parts = node.split("::")
    return ".".join([parts[0].removesuffix(".py").replace("/", "."), *parts[1:-1]]) + "::" + parts[-1]


def differences(a: dict[str, str], b: dict[str, str]) -> dict[str, list]:
    return {t: [a.get(t), b.get(t)] for t in sorted(set(a) | set(b)) if a.get(t) != b.get(t)}


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()


def main() -> int:
    started = time.monotonic()
    import vllm

    version = vllm.__version__
    sdist, sdist_info = get_sdist(version)
    src, taken = extract(sdist, version)
    work = CACHE / "runs"
    work.mkdir(parents=True, exist_ok=True)
    runs, res = {}, {}
    for name in RUNS:
        runs[name], res[name] = run(name, src, work)
    problems = []
    for name, r in runs.items():
        if r["rc"] not in (0, 1) or not res[name]:
            problems.append(f"{name}: pytest rc {r['rc']} ({r['summary']})")
    diff = differences(res["plain"], res["kvzip"])
    bind = runs["kvzip"].get("bind") or {}
    if not bind.get("managers_bound"):
        problems.append("kvzip: KVzip was bound to no KVCacheManager")
    if diff:
        problems.append(f"kvzip: {len(diff)} test(s) differ from the plain run")
    diff_all = differences(res["plain"], res["kvzip_all"])
    errors = (runs["kvzip_all"].get("bind") or {}).get("bind_error_tests", {})
    # the plugin records pytest node ids (path::Class::name), junit gives module.Class::name
    junit_errors = {junit_id(node): errs for node, errs in errors.items()}
    explained, unexplained = {}, []
    for t in diff_all:
        errs = junit_errors.get(t)
        if errs and all(e.get("connector_would_refuse") for e in errs):
            explained[t] = errs
        else:
            unexplained.append(t)
    if unexplained:
        problems.append(f"kvzip_all: {len(unexplained)} difference(s) not explained by bind() on refused configs")
    doc = {
        "what": "vLLM's own prefix-caching tests (its sdist's tests/v1/core), plain and with KVzip's scheduler "
                "state bound to every KVCacheManager they build (scripts/vllm_upstream_tests.sh, issue 16)",
        "vllm_version": version,
        "sdist": sdist_info,
        "files": FILES,
        "deselected": DESELECT,
        "extracted": taken,
        "plugin": {"path": str(PLUGIN.relative_to(ROOT)), "sha256": sha256(PLUGIN)},
        "commit": git("rev-parse", "HEAD"),
        "commit_note": "HEAD when run; the script, plugin and these results are committed together after the run",
        "worktree_dirty": bool(git("status", "--porcelain", "--", "scripts/vllm_upstream_tests.sh",
                                   str(PLUGIN.relative_to(ROOT)), "integrations")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "runs": runs,
        "comparison": {
            "kvzip_vs_plain": {"identical": not diff, "differences": diff},
            "kvzip_all_vs_plain": {"identical": not diff_all, "differences": diff_all,
                                   "explained_by_bind_errors_on_refused_configs": explained,
                                   "unexplained": unexplained},
        },
        "problems": problems,
        "ok": not problems,
        "wall_s": round(time.monotonic() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vllm-upstream-tests.json").write_text(json.dumps(doc, indent=1) + "\n")
    (RESULTS / "vllm-upstream-tests.md").write_text(markdown(doc))
    log(("PASS" if not problems else "FAIL: " + "; ".join(problems))
        + f" ({doc['wall_s']} s; benchmarks/results/vllm-upstream-tests.json)")
    return 0 if not problems else 1


def markdown(doc: dict) -> str:
    runs = doc["runs"]
    files = ", ".join(f"`{f.removeprefix('tests/v1/core/')}`" for f in doc["files"])
    deselected = "; ".join(f"`{k.split('::')[-1]}` ({v})" for k, v in doc["deselected"].items())
    lines = [
        f"# vLLM {doc['vllm_version']}'s own prefix-caching tests with KVzip bound",
        "",
        f"`scripts/vllm_upstream_tests.sh` ({doc['date']}, commit {doc['commit'][:10]}): the tests of vLLM's sdist "
        f"`{doc['sdist']['file']}` (sha256 `{doc['sdist']['sha256'][:16]}...`) in `tests/v1/core/`: {files}; "
        f"deselected: {deselected}.",
        "",
        "| run | passed | failed | skipped | error | managers bound | wrapped calls (lookup / allocate / stats) "
        "| tests using a bound manager | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        b = r.get("bind")
        if b:
            c = b["wrapped_calls"]
            bound = (f"{b['managers_bound']} of {b['managers_built']} (refused by the connector: "
                     f"{sum(b['managers_connector_would_refuse'].values())}, bind disabled: "
                     f"{sum(b['managers_bind_disabled'].values())})")
            calls = (f"{c.get('get_computed_blocks', 0)} / {c.get('allocate_slots', 0)} / "
                     f"{c.get('record_prefix_cache_stats', 0)}")
            tests = f"{b['tests_with_bound_manager']} ({b['tests_with_wrapped_calls']} with wrapped calls)"
        else:
            bound, calls, tests = "-", "-", "-"
        lines.append(f"| {name} | {r['passed']} | {r['failed']} | {r['skipped']} | {r['error']} | {bound} | {calls} "
                     f"| {tests} | {r['wall_s']} |")
    cmp = doc["comparison"]
    b = runs["kvzip"].get("bind") or {}
    lines += ["", "`kvzip`: bound where `KVzipConnector` binds in an engine (single full-attention group); "
              "`kvzip_all`: every manager, also configs the connector refuses (a stress run of `bind`). "
              f"Each lookup was also observed (detection, default trigger policy): jobs queued {b.get('jobs_queued')}, "
              f"compressed-prefix adoptions {b.get('adoptions')}; vLLM's tests build no compacted prefix, so what "
              "they check is that the bound wrappers leave vLLM's prefix caching exactly as it is.", ""]
    lines.append("kvzip vs plain: " + ("every test's outcome identical." if cmp["kvzip_vs_plain"]["identical"] else
                                       f"differences: {cmp['kvzip_vs_plain']['differences']}"))
    d = cmp["kvzip_all_vs_plain"]
    if d["identical"]:
        lines.append("kvzip_all vs plain: every test's outcome identical.")
    else:
        lines.append(f"kvzip_all vs plain: {len(d['differences'])} difference(s):")
        for t, (a, b) in d["differences"].items():
            why = d["explained_by_bind_errors_on_refused_configs"].get(t)
            why = "; ".join(f"{e['error']} on a config the connector refuses ({e['connector_would_refuse']})"
                            for e in why) if why else "NOT EXPLAINED"
            lines.append(f"- `{t}`: {a} -> {b}: {why}")
    lines += ["", "Result: " + ("PASS" if doc["ok"] else "FAIL: " + "; ".join(doc["problems"])), ""]
    return "\n".join(lines)


sys.exit(main())
PY
