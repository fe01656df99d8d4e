# SPDX-License-Identifier: Apache-2.0
"""Which compacted prefixes a job may displace (`retention.HitMeter`), and the bounded no-room wait."""

import math

import pytest

from kvzip_plugin.admission import Admission
from kvzip_plugin.detection import TriggerPolicy
from kvzip_plugin.retention import DISPLACE_FACTOR, HIT_HALF_LIFE_S, NO_ROOM_WAIT_S, HitMeter, RoomWait


def test_hits_decay_by_half_every_half_life_and_add_up():
    meter = HitMeter(half_life_s=100.0)
    assert meter.value("a", 0.0) == 0.0
    assert meter.hit("a", 0.0) == 1.0
    assert meter.value("a", 100.0) == pytest.approx(0.5)
    assert meter.hit("a", 100.0, n=2) == pytest.approx(2.5)
    assert meter.value("a", 300.0) == pytest.approx(2.5 / 4)
    # the same as summing every hit's own decay
    assert meter.value("a", 300.0) == pytest.approx(0.5 ** 3 + 2 * 0.5 ** 2)
    assert meter.value("a", 50.0) == pytest.approx(2.5)  # a read before the last hit does not grow it


def test_a_compacted_prefix_is_kept_unless_the_candidate_has_more_than_twice_its_hits():
    assert DISPLACE_FACTOR == 2.0
    meter = HitMeter()
    meter.hit("old", 0.0, n=3)
    meter.hit("new", 0.0, n=3)
    assert meter.keeps("old", "new", 0.0)  # the same traffic: no churn
    # whichever came last: the same 3 hits a minute later still keep the older prefix
    meter.hit("later", 60.0, n=3)
    assert meter.value("old", 60.0) < meter.value("later", 60.0) and meter.keeps("old", "later", 60.0)
    meter.hit("new", 0.0, n=3)
    assert meter.keeps("old", "new", 0.0)  # 6 is not more than 2 x 3
    meter.hit("new", 0.0)
    assert not meter.keeps("old", "new", 0.0)
    # a tenant that left: its hits decay; a candidate hit twice now outweighs 3 hits of an hour ago
    meter.hit("busy", 3600.0, n=2)
    assert meter.value("old", 3600.0) == pytest.approx(3 * math.exp2(-3600.0 / HIT_HALF_LIFE_S))
    assert not meter.keeps("old", "busy", 3600.0)
    assert meter.keeps("busy", "never-hit", 3600.0)
    assert not meter.keeps("never-hit", "busy", 3600.0)


def test_the_meter_is_bounded_and_rejects_a_bad_half_life():
    meter = HitMeter(max_keys=2)
    for i, key in enumerate("abc"):
        meter.hit(key, float(i))
    assert meter.value("a", 3.0) == 0.0 and meter.value("c", 3.0) > 0
    with pytest.raises(ValueError, match="half_life_s"):
        HitMeter(half_life_s=0.0)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="displace_factor"):
            HitMeter(displace_factor=bad)


def test_the_displace_factor_sets_how_much_hotter_a_candidate_must_be():
    meter = HitMeter(displace_factor=1.0)
    meter.hit("old", 0.0, n=3)
    meter.hit("new", 0.0, n=3)
    assert meter.keeps("old", "new", 0.0)  # a tie keeps
    meter.hit("new", 0.0)
    assert not meter.keeps("old", "new", 0.0)
    off = HitMeter(displace_factor=0.0)
    off.hit("old", 0.0, n=1000)
    assert not off.keeps("old", "new", 0.0)  # off: every compacted prefix is room


def test_admission_meters_every_counted_hit_and_the_hits_a_compacted_prefix_serves():
    adm = Admission(TriggerPolicy(min_prefix_tokens=8, min_hits=2))
    offer = adm.offer("p", 16, now=0.0)  # the request that cached it counts too: 2 hits, a job
    assert offer.job is not None and adm.meter.value("p", 0.0) == 2.0
    assert adm.offer("short", 4, now=0.0).candidate is None and adm.meter.value("short", 0.0) == 0.0
    adm.note_compressed_hit("q", now=0.0)
    assert adm.keeps("q", "p", 0.0)
    adm.note_queued_hit("p", now=0.0)
    assert adm.meter.value("p", 0.0) == 3.0 and not adm.keeps("q", "p", 0.0)


def test_the_no_room_wait_is_bounded_and_restarts_when_cleared():
    wait = RoomWait()
    assert not wait.expired(0.0)  # the first check without room starts it
    assert not wait.expired(NO_ROOM_WAIT_S - 1)
    wait.clear()  # requests ran (or room was found)
    assert not wait.expired(NO_ROOM_WAIT_S)
    assert not wait.expired(2 * NO_ROOM_WAIT_S - 1)
    assert wait.expired(2 * NO_ROOM_WAIT_S)
    assert wait.since is None  # cleared for the next job
    assert not wait.expired(3 * NO_ROOM_WAIT_S)
    assert not wait.expired(5 * NO_ROOM_WAIT_S, running=True)  # requests run: they will free slots
    assert wait.since is None and not wait.expired(5 * NO_ROOM_WAIT_S)
