# SPDX-License-Identifier: Apache-2.0
"""A process that imports vLLM once and forks one fresh child per scenario (test harness only).

Importing vLLM and its `LLM` class costs 15-20 s of the ~25 s a scenario process takes on the 2-core CI
machine, and the e2e modules start two dozen of them. The zygote pays that once: it imports vLLM (nothing
else: no engine, no plugin, no torch op, so no thread pool exists yet and `fork` is safe), then for each
request forks a child that sets the scenario's whole environment, redirects its output to files and runs
the scenario module as `python -m` would. Every child is a fresh engine process in all that matters to
the tests (general plugins, vLLM's env cache and the plugin's state are first touched in the child); only
the import is shared.

Protocol (one JSON object per line): the parent writes `{"module", "args", "env", "cwd", "stdout",
"stderr"}`, the zygote answers `{"pid"}` at once and `{"rc"}` when the child exits.
"""

from __future__ import annotations

import json
import os
import runpy
import sys


def _child(req: dict) -> None:
    """In the forked child: become `python -m module args` with exactly `env`; never returns."""
    code = 1
    try:
        out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        sys.argv = [req["module"], *req["args"]]
        try:
            runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001  (report it as the scenario's failure, as a fresh process would)
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    proto = os.fdopen(os.dup(1), "w")  # the answers; anything printed (imports, children) never reaches it
    os.dup2(2, 1)
    from vllm import LLM  # noqa: F401  (the point of this process: the import the children share)

    def answer(msg: dict) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    answer({"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            proto.close()
            _child(req)
        answer({"pid": pid})
        _, status = os.waitpid(pid, 0)
        answer({"rc": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    main()
