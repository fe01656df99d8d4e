# SPDX-License-Identifier: Apache-2.0
"""One process's registration of the plugin with a serving engine, the same for vLLM and SGLang.

Engines call their plugin entry points in every process, sometimes more than once and sometimes from
inside a call the registration itself makes. `Registration.run` therefore runs at most once per process
(re-entrant: a nested call returns at once), fails closed (an unsupported engine version, or any error,
leaves the engine unchanged with one warning line) and never raises.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable


class Registration:
    """Whether the plugin is registered in this process, and why not."""

    def __init__(self, engine: str, logger: logging.Logger) -> None:
        self.engine, self.logger = engine, logger
        self.lock = threading.RLock()
        self.done = False
        self.active = False
        self.reason: str | None = None

    def run(self, version: Callable[[], str], unsupported: Callable[[str], str | None],
            apply: Callable[[], None]) -> None:
        """Register once: `unsupported(version())` is a reason to refuse (None: supported), then
        `apply()` does the engine-specific registration. Never raises."""
        with self.lock:
            if self.done:
                return
            self.done = True  # set first: a nested call (re-entrancy) returns at once
            try:
                found = version()
                reason = unsupported(found)
                if reason is not None:
                    self.reason = reason
                    self.logger.warning("kvzip-plugin: %s; KV compression disabled, %s left unchanged", reason,
                                        self.engine)
                    return
                apply()
                self.active = True
                self.logger.info("kvzip-plugin: registered for %s %s (pid %d)", self.engine, found, os.getpid())
            except Exception as exc:  # fail closed: a plugin error must not take the engine down
                self.reason = f"registration failed: {exc!r}"
                self.logger.warning("kvzip-plugin: registration failed (%r); KV compression disabled", exc)
