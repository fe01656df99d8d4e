# SPDX-License-Identifier: Apache-2.0
"""pytest plugin: KVzip's scheduler state bound to every `KVCacheManager` vLLM's own tests build.

Loaded by `scripts/vllm_upstream_tests.sh` into vLLM's prefix-caching tests (`-p upstream_bind`, this
folder on PYTHONPATH; it imports nothing from this repository's `tests` package, whose name vLLM's
tests also use). It patches `vllm.v1.core.kv_cache_manager.KVCacheManager.__init__` so that every new
manager gets its own `SchedulerState` (the scheduler half of `KVzipConnector`, built as the connector
builds it: KVzipConfig with the default structure, the default TriggerPolicy and ScoringBudget) and
`SchedulerState.bind(manager)` is called, which is what `KVzipConnector.bind_kv_cache_manager` does in
a real engine: `get_computed_blocks`, `allocate_slots` and `record_prefix_cache_stats` are replaced
on the instance by the plugin's wrappers, so every call a test makes through the manager goes through
them. After each `get_computed_blocks` the state also `observe`s the request with its hit length, as
vLLM's Scheduler does through the connector's `get_num_new_matched_tokens` (detection and admission
bookkeeping on vLLM's real Request objects; jobs never start: no scheduler step runs them).

Modes (`KVZIP_UPSTREAM_BIND_MODE`):
  `all` (default): bind every manager, also those on a KV-cache config the connector refuses (hybrid
      groups, sliding window, ...); the counts say how many of those there were.
  `connector`: bind only where `connector.unsupported_reason` says the connector would (it is
      disabled, and binds nothing, otherwise).
`KVZIP_UPSTREAM_OBSERVE=0` leaves out the `observe` calls.

Counts (managers built / bound / refused by `bind` itself, e.g. `hash_block_size`; calls through each
wrapper; tests that used a bound manager) go to the JSON file named by `KVZIP_UPSTREAM_BIND_REPORT`
and to pytest's terminal summary.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from contextlib import contextmanager
from typing import Any

import pytest

_PATCHED = "__kvzip_upstream_bind__"


class BindCounter:
    """What the patch did, over a whole session (or one `patched()` block)."""

    def __init__(self) -> None:
        self.managers_built = 0
        self.managers_bound = 0  # wrapped: bind ran to the end
        self.bind_disabled: Counter[str] = Counter()  # bind itself set `disabled` (manager not wrapped)
        self.connector_refuses: Counter[str] = Counter()  # unsupported_reason on the manager's config
        self.skipped_by_mode = 0  # connector mode: not bound because the connector would be disabled
        self.bind_errors: list[dict[str, Any]] = []  # {"error", "connector_would_refuse"}
        self.bind_error_tests: dict[str, list[dict[str, Any]]] = {}  # test id -> its bind errors
        self.calls: Counter[str] = Counter()  # calls through the wrappers
        self.observe_calls = 0
        self.jobs_queued = 0
        self.adoptions = 0  # lookups that found a compacted prefix (none is ever published here)
        self.tests = 0
        self.tests_with_bound_manager = 0
        self.tests_with_wrapped_calls = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "managers_built": self.managers_built,
            "managers_bound": self.managers_bound,
            "managers_bind_disabled": dict(self.bind_disabled),
            "managers_connector_would_refuse": dict(self.connector_refuses),
            "managers_skipped_by_mode": self.skipped_by_mode,
            "bind_errors": len(self.bind_errors),
            "bind_error_tests": self.bind_error_tests,
            "wrapped_calls": dict(self.calls),
            "observe_calls": self.observe_calls,
            "jobs_queued": self.jobs_queued,
            "adoptions": self.adoptions,
            "tests_run": self.tests,
            "tests_with_bound_manager": self.tests_with_bound_manager,
            "tests_with_wrapped_calls": self.tests_with_wrapped_calls,
        }


_VLLM_CONFIG: Any = None


def _vllm_config() -> Any:
    """One real VllmConfig without a model (SchedulerState reads its model config only to score, never here;
    `unsupported_reason` reads the cache, parallel, speculative and compilation configs)."""
    global _VLLM_CONFIG
    if _VLLM_CONFIG is None:
        from vllm.config import CacheConfig, VllmConfig

        _VLLM_CONFIG = VllmConfig(cache_config=CacheConfig(enable_prefix_caching=True))
    return _VLLM_CONFIG


def _make_state(counter: BindCounter, observe: bool) -> Any:
    from kvzip_plugin.integrations.vllm.scheduler import SchedulerState

    from kvzip_plugin.config import KVzipConfig
    from kvzip_plugin.detection import TriggerPolicy
    from kvzip_plugin.settings import DEFAULT_STRUCTURE
    from kvzip_plugin.slicing import ScoringBudget

    class CountingState(SchedulerState):
        """SchedulerState whose wrapped-method bodies count their calls (bind's instance wrappers call
        `self._get_computed_blocks` / `self._allocate_slots`, looked up at each call)."""

        def _get_computed_blocks(self, original, request, *args, **kwargs):
            counter.calls["get_computed_blocks"] += 1
            out = super()._get_computed_blocks(original, request, *args, **kwargs)
            if request.request_id in self.offsets:
                counter.adoptions += 1
            if observe and isinstance(out, tuple) and len(out) >= 2 and isinstance(out[1], int):
                queued = len(self.jobs)
                self.observe(request, out[1])  # the Scheduler's next call, via get_num_new_matched_tokens
                counter.observe_calls += 1
                counter.jobs_queued += len(self.jobs) - queued
            return out

        def _allocate_slots(self, original, request, *args, **kwargs):
            counter.calls["allocate_slots"] += 1
            return super()._allocate_slots(original, request, *args, **kwargs)

    config = KVzipConfig(structure=DEFAULT_STRUCTURE, scorer="kvzip")
    return CountingState(config, TriggerPolicy(), _vllm_config(), ScoringBudget())


def attach(manager: Any, counter: BindCounter, mode: str = "all", observe: bool = True) -> Any:
    """Bind a fresh SchedulerState to `manager` (as `KVzipConnector.bind_kv_cache_manager` does); returns it."""
    from kvzip_plugin.integrations.vllm.connector import unsupported_reason

    counter.managers_built += 1
    state = _make_state(counter, observe)
    reason = unsupported_reason(_vllm_config(), manager.kv_cache_config, state.config.structure)
    if reason is not None:
        counter.connector_refuses[reason] += 1
        if mode == "connector":  # KVzipConnector.bind_kv_cache_manager binds nothing when it is disabled
            counter.skipped_by_mode += 1
            return None
    try:
        state.bind(manager)
    except Exception as exc:  # recorded with the connector's verdict on this config, then re-raised
        counter.bind_errors.append({"error": f"{type(exc).__name__}: {exc}", "connector_would_refuse": reason})
        raise
    if state.disabled:
        counter.bind_disabled[state.disabled] += 1
        return state
    record = manager.__dict__.get("record_prefix_cache_stats")
    if record is not None:  # count the calls through bind's wrapper (the Scheduler's admission path)
        @functools.wraps(record)
        def counted(request, *args, **kwargs):
            counter.calls["record_prefix_cache_stats"] += 1
            return record(request, *args, **kwargs)

        manager.record_prefix_cache_stats = counted
    counter.managers_bound += 1
    return state


def is_bound(manager: Any) -> bool:
    """The manager's lookup and allocation are the plugin's instance wrappers, not the class's methods."""
    return all(name in vars(manager) and getattr(manager, name) is not getattr(type(manager), name)
               for name in ("get_computed_blocks", "allocate_slots"))


def install(counter: BindCounter, mode: str = "all", observe: bool = True) -> Any:
    """Patch `KVCacheManager.__init__`; returns the original (for `uninstall`)."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    original = KVCacheManager.__init__
    if getattr(original, _PATCHED, False):
        raise RuntimeError("KVCacheManager.__init__ is already patched")

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        attach(self, counter, mode, observe)  # an error in bind fails the test: a finding

    setattr(__init__, _PATCHED, True)
    KVCacheManager.__init__ = __init__
    return original


def uninstall(original: Any) -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    KVCacheManager.__init__ = original


@contextmanager
def patched(mode: str = "all", observe: bool = True):
    """`with patched() as counter:` every KVCacheManager built inside is bound."""
    counter = BindCounter()
    original = install(counter, mode, observe)
    try:
        yield counter
    finally:
        uninstall(original)


# ---------------------------------------------------------------- pytest plugin hooks

_SESSION: dict[str, Any] = {}


def pytest_configure(config) -> None:
    mode = os.environ.get("KVZIP_UPSTREAM_BIND_MODE", "all")
    if mode not in ("all", "connector"):
        raise ValueError(f"KVZIP_UPSTREAM_BIND_MODE={mode!r}: 'all' or 'connector'")
    observe = os.environ.get("KVZIP_UPSTREAM_OBSERVE", "1") != "0"
    counter = BindCounter()
    _vllm_config()  # built once, before any test runs
    _SESSION.update(counter=counter, mode=mode, observe=observe, original=install(counter, mode, observe))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    counter: BindCounter | None = _SESSION.get("counter")
    if counter is None:
        return (yield)
    bound, calls, errors = counter.managers_bound, sum(counter.calls.values()), len(counter.bind_errors)
    _SESSION["fixture_bound"] = False
    result = yield
    if len(counter.bind_errors) > errors:
        counter.bind_error_tests[item.nodeid] = counter.bind_errors[errors:]
    counter.tests += 1
    counter.tests_with_bound_manager += counter.managers_bound > bound or _SESSION.pop("fixture_bound", False)
    counter.tests_with_wrapped_calls += sum(counter.calls.values()) > calls
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    """A manager built by a wider-scoped fixture (before this test) counts for the tests that use it."""
    if "counter" in _SESSION:
        funcargs = getattr(item, "funcargs", {}) or {}
        _SESSION["fixture_bound"] = any(is_bound(v) for v in funcargs.values() if hasattr(v, "kv_cache_config"))


def _report() -> dict[str, Any]:
    counter: BindCounter = _SESSION["counter"]
    return {"mode": _SESSION["mode"], "observe": _SESSION["observe"], **counter.as_dict()}


def pytest_terminal_summary(terminalreporter) -> None:
    if "counter" not in _SESSION:
        return
    r = _report()
    terminalreporter.write_sep("-", "kvzip upstream bind")
    terminalreporter.write_line(
        f"KVCacheManagers built {r['managers_built']}, bound {r['managers_bound']}, bind disabled "
        f"{r['managers_bind_disabled']}, connector would refuse {r['managers_connector_would_refuse']} "
        f"(mode {r['mode']}); wrapped calls {r['wrapped_calls']}, observe {r['observe_calls']}, jobs queued "
        f"{r['jobs_queued']}; bind errors {r['bind_errors']}; tests with a bound manager "
        f"{r['tests_with_bound_manager']}/{r['tests_run']}, with wrapped calls {r['tests_with_wrapped_calls']}")


def pytest_unconfigure(config) -> None:
    if "counter" not in _SESSION:
        return
    path = os.environ.get("KVZIP_UPSTREAM_BIND_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(_report(), f, indent=1)
    uninstall(_SESSION.pop("original"))
    _SESSION.clear()
