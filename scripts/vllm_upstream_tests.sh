#!/usr/bin/env bash
# vLLM's own scheduler / prefix-caching tests, from the sdist of the vLLM version the CPU CI runs (0.32.0),
# twice: as vLLM ships them, and with the KVzip connector attached to every Scheduler they build
# (tests/integrations/vllm/upstream_attach.py). Issue 16: the plugin must not change what vLLM's own tests
# assert. Outside the default CI (a 45 MB download and several minutes); writes
# benchmarks/results/vllm-upstream-tests.json (per-test outcomes of both runs, and the tests whose outcome
# differs) and exits non-zero if any test passes without the plugin and fails with it.
#
#   bash scripts/setup.sh && bash scripts/setup_vllm.sh && bash scripts/vllm_upstream_tests.sh
#   TESTS="tests/v1/core/test_prefix_caching.py" bash scripts/vllm_upstream_tests.sh   # a subset
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
VERSION=0.32.0
SHA256=d2c957d5eee3d0985012151315ddc62cbe0cd368fc96a5fc3510438d9dddf2ad
URL=https://files.pythonhosted.org/packages/d5/df/5471312c76e335eaa2b8333e87ea39f0d37bfe24f10a582620e34ff12e33/vllm-$VERSION.tar.gz
CACHE="${KVZIP_CACHE_DIR:-$HOME/.cache/kvzip-plugin}/vllm-sdist"
TESTS="${TESTS:-tests/v1/core/test_prefix_caching.py tests/v1/core/test_scheduler.py}"
OUT="${OUT:-benchmarks/results/vllm-upstream-tests.json}"
mkdir -p "$CACHE"
if [ ! -f "$CACHE/vllm-$VERSION.tar.gz" ] || ! echo "$SHA256  $CACHE/vllm-$VERSION.tar.gz" | sha256sum -c --quiet -; then
    echo "vllm_upstream_tests.sh: downloading the vLLM $VERSION sdist (45 MB)" >&2
    curl -fsSL -o "$CACHE/vllm-$VERSION.tar.gz.part" "$URL"
    echo "$SHA256  $CACHE/vllm-$VERSION.tar.gz.part" | sha256sum -c --quiet -
    mv "$CACHE/vllm-$VERSION.tar.gz.part" "$CACHE/vllm-$VERSION.tar.gz"
fi
SRC="$CACHE/vllm-$VERSION"
if [ ! -d "$SRC/tests" ]; then
    tar xzf "$CACHE/vllm-$VERSION.tar.gz" -C "$CACHE" "vllm-$VERSION/tests"
fi
# vLLM's test conftest imports tblib; kept beside the sources, not in the project's venv
if [ ! -d "$CACHE/deps/tblib" ]; then
    "$PY" -m pip install --quiet --disable-pip-version-check --target "$CACHE/deps" tblib==3.2.2
fi
REPO="$PWD"
run() {  # $1: name, rest: extra pytest args
    local name=$1; shift
    echo "vllm_upstream_tests.sh: vLLM's tests ($name): $TESTS" >&2
    (cd "$SRC" && PYTHONPATH="$CACHE/deps:$REPO" "$REPO/$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
        --junitxml="$CACHE/$name.xml" "$@" $TESTS >"$CACHE/$name.log" 2>&1) || true
    tail -1 "$CACHE/$name.log" >&2
}
run plain
run kvzip -p tests.integrations.vllm.upstream_attach
"$PY" - "$CACHE/plain.xml" "$CACHE/kvzip.xml" "$CACHE/kvzip.log" "$OUT" "$VERSION" "$TESTS" <<'EOF'
import json, re, subprocess, sys, xml.etree.ElementTree as ET
plain_xml, kvzip_xml, kvzip_log, out, version, tests = sys.argv[1:]

def outcomes(path):
    res = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kind = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                kind = "failed"
            elif child.tag == "skipped":
                kind = "skipped"
        res[name] = kind
    return res

a, b = outcomes(plain_xml), outcomes(kvzip_xml)
count = lambda r: {k: sum(v == k for v in r.values()) for k in ("passed", "failed", "skipped")}
attached = re.search(r"KVzip connector attached to (\d+) schedulers", open(kvzip_log).read())
broke = sorted(n for n in a if a[n] == "passed" and b.get(n) != "passed")
doc = {"vllm": version, "tests": tests.split(), "plain": count(a), "kvzip": count(b),
       "schedulers_with_kvzip": int(attached.group(1)) if attached else None,
       "pass_without_fail_with_kvzip": broke,
       "fail_without_kvzip": sorted(n for n in a if a[n] == "failed"),
       "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()}
open(out, "w").write(json.dumps(doc, indent=1) + "\n")
print(f"vLLM {version} own tests: without the plugin {doc['plain']}, with KVzip attached to "
      f"{doc['schedulers_with_kvzip']} schedulers {doc['kvzip']}; passing only without it: {len(broke)}")
sys.exit(1 if broke else 0)
EOF
