# SPDX-License-Identifier: Apache-2.0
"""The host-stall probe sees a gap it was given: the probe process stopped (SIGSTOP) for 0.5 s, then resumed."""

from __future__ import annotations

import os
import signal
import time

from kvzip_plugin.eval.host_stalls import HostStallMonitor


def test_the_probe_reports_a_gap_where_it_was_not_scheduled():
    with HostStallMonitor(threshold_s=0.1) as mon:
        time.sleep(0.2)
        os.kill(mon._proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        time.sleep(0.5)
        os.kill(mon._proc.pid, signal.SIGCONT)
        resumed = time.monotonic()
        time.sleep(0.2)
    # the probe woke up once after SIGCONT, at least 0.5 s after its previous wake-up
    hits = [(t, g) for t, g in mon.gaps if resumed - 0.05 <= t and t - g <= stopped + 0.05]
    assert hits and all(g >= 0.45 for _, g in hits), mon.gaps
    s = mon.summary(start=stopped)
    assert s["count"] == len(mon.gaps) and s["max_s"] >= 0.45 and s["total_s"] >= s["max_s"]
    assert any(abs(t - (resumed - stopped)) < 0.2 for t, _ in s["gaps"]), s


def test_no_threshold_crossing_means_no_gap_recorded():
    with HostStallMonitor(threshold_s=5.0) as mon:  # nothing on this host waits 5 s between two 10-ms sleeps
        time.sleep(0.3)
    assert mon.gaps == [] and mon.summary()["count"] == 0
