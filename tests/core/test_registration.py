# SPDX-License-Identifier: Apache-2.0
"""`Registration`: once per process, re-entrant, fails closed, never raises (both engines' entry points)."""

from __future__ import annotations

import logging

from kvzip_plugin.registration import Registration
from tests.helpers import ListHandler


def _registration() -> tuple[Registration, ListHandler]:
    logger = logging.getLogger("kvzip-test-registration")
    logger.setLevel(logging.INFO)
    handler = ListHandler()
    logger.handlers[:] = [handler]
    return Registration("Engine", logger), handler


def test_runs_once_and_reentrant_calls_return_at_once():
    reg, log = _registration()
    calls = []

    def apply():
        calls.append("apply")
        reg.run(lambda: "1.0", lambda v: None, lambda: calls.append("nested"))  # e.g. a plugin loader recursing

    reg.run(lambda: "1.0", lambda v: None, apply)
    reg.run(lambda: "1.0", lambda v: None, apply)
    assert calls == ["apply"] and reg.active and reg.reason is None
    assert len(log.messages) == 1 and log.messages[0].startswith("kvzip-plugin: registered for Engine 1.0 (pid ")


def test_unsupported_version_applies_nothing():
    reg, log = _registration()
    calls = []
    reg.run(lambda: "0.9", lambda v: f"Engine {v} is not supported", lambda: calls.append("apply"))
    assert calls == [] and not reg.active and reg.reason == "Engine 0.9 is not supported"
    assert log.messages == ["kvzip-plugin: Engine 0.9 is not supported; KV compression disabled, Engine left unchanged"]


def test_errors_fail_closed_without_raising():
    reg, log = _registration()

    def boom():
        raise RuntimeError("boom")

    reg.run(lambda: "1.0", lambda v: None, boom)
    assert not reg.active and reg.reason == "registration failed: RuntimeError('boom')"
    assert log.messages == ["kvzip-plugin: registration failed (RuntimeError('boom')); KV compression disabled"]
