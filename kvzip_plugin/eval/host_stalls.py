# SPDX-License-Identifier: Apache-2.0
"""Scheduling gaps of the benchmark host itself, recorded beside a latency measurement.

On the 2-core CPU host, while vLLM's engine core and worker hold both cores, the whole host went unscheduled
for 0.9-1.9 s at a time (measured during the fault suite's KVzip jobs: the client's own threads and a
separate process that only sleeps 20 ms at a time saw the same gaps; `/proc/stat` showed both cores in user
time, no steal). A client that timestamps tokens then records such a gap as an inter-token latency whatever
the server did. `HostStallMonitor` runs a separate process that sleeps `tick_s` at a time and reports every
wake-up later than `threshold_s`, so a benchmark can say how much of its latency tail the host itself made.

    with HostStallMonitor() as stalls:
        run_the_load()
    stalls.summary(start=t0)  # {"count", "total_s", "max_s", "gaps": [[seconds after t0, gap], ...]}
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

THRESHOLD_S = 0.1
"""A wake-up this late counts as a stall: far above a CPU-bound host's normal scheduling delay (a few ms),
well below the gaps that move a latency tail (the measured ones were 0.9-1.9 s)."""


@dataclass
class HostStallMonitor:
    """Context manager: a probe process (`python -m kvzip_plugin.eval.host_stalls`) runs while the block
    runs; `gaps` holds `(time.monotonic() at wake-up, seconds since the previous wake-up)` for each stall
    (CLOCK_MONOTONIC is the host's clock, the same in both processes)."""

    threshold_s: float = THRESHOLD_S
    tick_s: float = 0.01
    gaps: list[tuple[float, float]] = field(default_factory=list)
    _proc: subprocess.Popen | None = None

    def __enter__(self) -> HostStallMonitor:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "kvzip_plugin.eval.host_stalls", str(self.tick_s), str(self.threshold_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self._proc.stdout.readline().strip() != "ready":  # the probe's loop is running
            raise RuntimeError("the host-stall probe did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self._proc.communicate("stop\n", timeout=30)  # the probe stops when its stdin closes
        self.gaps = [(float(t), float(g)) for t, g in (line.split() for line in out.splitlines() if line.strip())]

    def summary(self, start: float | None = None) -> dict[str, Any]:
        """Count, total and largest stall; each as [seconds after `start` (or the raw clock), gap]."""
        t0 = 0.0 if start is None else start
        return {"threshold_s": self.threshold_s, "count": len(self.gaps),
                "total_s": round(sum(g for _, g in self.gaps), 3),
                "max_s": round(max((g for _, g in self.gaps), default=0.0), 3),
                "gaps": [[round(t - t0, 3), round(g, 3)] for t, g in self.gaps]}


def _probe(tick_s: float, threshold_s: float) -> None:
    """Sleep `tick_s` at a time until stdin closes or says anything; print `wake-up-time gap` for each late
    wake-up, all at the end (printing during the load would cost the host CPU)."""
    import threading

    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), done.set()), daemon=True).start()
    gaps = []
    print("ready", flush=True)
    prev = time.monotonic()
    while not done.is_set():
        time.sleep(tick_s)
        now = time.monotonic()
        if now - prev > threshold_s:
            gaps.append((now, now - prev))
        prev = now
    print("\n".join(f"{t:.6f} {g:.6f}" for t, g in gaps), flush=True)


if __name__ == "__main__":
    _probe(float(sys.argv[1]), float(sys.argv[2]))
