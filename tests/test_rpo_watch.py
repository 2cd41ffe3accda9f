"""The RPO watch, the scrape and the status answer on a tracker of their own
(no mount): the watch looks only at groups that had an event or whose
deadline came, never at every group on a timer, and still logs each change
of state once; a scrape and a status answer are built a few groups per loop
step, and say the same as when built in one."""

from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from prometheus_client import CollectorRegistry, generate_latest

from vrfs import stepbudget
from vrfs.control import _encoded
from vrfs.metrics import SourceCollector, _exposition
from vrfs.monitor import Monitor
from vrfs.scheduler import Scheduler
from vrfs.settings import Settings
from vrfs.tracker import Disk, Tracker

pytestmark = pytest.mark.timeout(60)
RPO = 2.0
DISKS, GROUPS = 1000, 300


class Clock:
    """time.monotonic for the monitor and the tracker, moved by the test."""

    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def datastore(monkeypatch, clock) -> tuple[Monitor, Tracker, dict[str, int]]:
    """1,000 clean disks in 300 groups, a shipper's worth of parts around them,
    and a count of the times anything asked for a group's disks."""
    monkeypatch.setattr(time, "monotonic", clock)
    tracker = Tracker(-1, -1, 65536)
    for i in range(DISKS):
        ino = i + 1
        tracker.disks[ino] = Disk(ino.to_bytes(16, "big"), ino, f"vm{i % GROUPS:03d}/d{i // GROUPS}.raw",
                                  1 << 22, 65536, 4 << 20, last_ack_cycle=1)
    shipper = SimpleNamespace(tracker=tracker, points={}, connected=True, last_error="", name="src",
                              scheduler=Scheduler(tracker, Settings({"rpo": RPO, "compression": 1})))
    shipper.predicted_breach = shipper.scheduler.predicted_breach
    monitor = Monitor(shipper)  # type: ignore[arg-type]
    shipper.monitor = monitor
    tracker.change_listener = monitor.touch
    asked = {"group_disks": 0}
    real = tracker.group_disks

    def counting(name: str) -> list[Disk]:
        asked["group_disks"] += 1
        return real(name)
    monkeypatch.setattr(tracker, "group_disks", counting)
    return monitor, tracker, asked


def test_idle_groups_cost_nothing_and_each_change_of_state_is_logged_once(monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="vrfs.shipper")
    clock = Clock()
    monitor, tracker, asked = datastore(monkeypatch, clock)
    watch = monitor.rpo_watch
    for group in monitor.group_names():  # what run() does first
        watch.touch(group)
    while watch.check(clock.now):
        pass
    assert watch.looked_at == GROUPS and watch.next_deadline() is None  # all clean: nothing to wait for

    # 200 wake-ups over 100 s of idle groups: no group is looked at again.
    asked["group_disks"] = 0
    for _ in range(200):
        clock.now += 0.5
        watch.check(clock.now)
        monitor.sample_flights()
    assert watch.looked_at == GROUPS, watch.looked_at
    assert asked["group_disks"] == 0, asked

    # One group is written: it alone is looked at, then once more when its RPO runs out.
    tracker.note_change("vm007")
    watch.check(clock.now)
    assert watch.looked_at == GROUPS + 1
    assert watch.next_deadline() == pytest.approx(clock.now + RPO, abs=0.01)
    clock.now += RPO - 0.1
    watch.check(clock.now)
    assert "RPO violated" not in caplog.text and watch.looked_at == GROUPS + 1
    clock.now += 0.2
    watch.check(clock.now)
    assert watch.looked_at == GROUPS + 2
    assert caplog.text.count("vm007: RPO violated: the DR site would lose 2 s of writes (RPO 2 s)") == 1, caplog.text

    # Violated stays violated without an event: no deadline, no visits, no second line.
    for _ in range(100):
        clock.now += 0.5
        watch.check(clock.now)
    assert watch.looked_at == GROUPS + 2 and watch.next_deadline() is None
    assert caplog.text.count("RPO violated") == 1

    # Its cycle commits (the tracker forgets the oldest write; the monitor is told).
    tracker.groups["vm007"].oldest_change = None
    monitor.touch("vm007")
    watch.check(clock.now)
    assert watch.looked_at == GROUPS + 3
    assert caplog.text.count("vm007: RPO met again (lag 0.0 s, RPO 2 s)") == 1, caplog.text
    assert [line for line in caplog.text.splitlines() if "RPO" in line and "vm007" not in line] == []


def test_groups_of_unknown_age_turn_violated_at_their_deadline(monkeypatch, caplog) -> None:
    """After a restart a dirty group's oldest write is unknown: its lag counts
    from the daemon's start (basis "start"), and it turns violated RPO later."""
    clock = Clock()
    monitor, tracker, _ = datastore(monkeypatch, clock)
    watch = monitor.rpo_watch
    monitor.unknown_oldest = {"vm001", "vm002"}
    monitor.started_wall = time.time()
    for group in monitor.group_names():
        watch.touch(group)
    while watch.check(clock.now):
        pass
    due = watch.next_deadline()
    assert due is not None and due - clock.now == pytest.approx(RPO, abs=0.1)
    looked = watch.looked_at
    monkeypatch.setattr(time, "time", lambda: monitor.started_wall + RPO + 0.5)
    clock.now = due + 0.01  # the two deadlines were taken microseconds apart
    watch.check(clock.now)
    assert watch.looked_at == looked + 2  # the two groups whose deadline came, no other
    assert "vm001: RPO violated" in caplog.text and "vm002: RPO violated" in caplog.text


def test_the_watch_sleeps_until_a_deadline_or_an_event(monkeypatch, caplog) -> None:
    """run() under a mock clock: 100 s of idle time cost no group visit; a
    change wakes it at once and the violation is logged at its deadline."""
    monitor: Monitor | None = None

    async def main() -> None:
        nonlocal monitor
        monkeypatch.setattr(time, "monotonic", trio.current_time)
        monitor, tracker, _ = datastore(monkeypatch, trio.current_time)
        watch = monitor.rpo_watch
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run)
            await trio.sleep(1)
            assert watch.looked_at == GROUPS
            await trio.sleep(100)
            assert watch.looked_at == GROUPS
            tracker.note_change("vm123")
            await trio.sleep(0.1)
            assert watch.looked_at == GROUPS + 1 and "RPO violated" not in caplog.text
            await trio.sleep(RPO)
            assert watch.looked_at == GROUPS + 2
            assert caplog.text.count("vm123: RPO violated") == 1
            await trio.sleep(100)
            assert watch.looked_at == GROUPS + 2
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_scrape_reads_the_groups_a_few_per_loop_step(monkeypatch) -> None:
    """With no time budget the scrape yields after every group, and what it
    reports is what a scrape in one step reports."""
    clock = Clock()
    monitor, tracker, _ = datastore(monkeypatch, clock)
    tracker.disks[1].active.set_range(0, 3)
    tracker.group("vm000").oldest_change = clock.now - 1  # lags on the test's clock: the same in both scrapes
    collector = SourceCollector(monitor.shipper)
    whole = [(m.name, [(s.labels, s.value) for s in m.samples]) for m in collector.collect()]
    monkeypatch.setattr(stepbudget, "STEP_BUDGET", 0.0)
    _, others_ran = run_counting_steps(collector.refresh)
    assert others_ran >= GROUPS - 1, others_ran
    sliced = [(m.name, [(s.labels, s.value) for s in m.samples]) for m in collector.collect()]
    assert sliced == whole
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    assert trio.run(_exposition, registry) == generate_latest(registry)
    dirty = dict((s.labels["group"], s.value) for s in next(m for m in collector.collect()
                                                               if m.name == "vrfs_dirty_bytes").samples)
    assert dirty["vm000"] == 3 * 65536 and sum(dirty.values()) == 3 * 65536


def test_a_status_answer_is_encoded_a_few_disks_per_loop_step(monkeypatch) -> None:
    monkeypatch.setattr(stepbudget, "STEP_BUDGET", 0.0)
    answer = {"source": "/srv/vmdks", "pid": 1, "disks": [{"path": f"vm{i:03d}/d.raw", "lag_seconds": i / 7,
                                                           "last_point": None} for i in range(DISKS)]}
    encoded, others_ran = run_counting_steps(lambda: _encoded(answer))
    assert encoded == json.dumps(answer).encode() + b"\n"
    assert others_ran >= DISKS - 1, others_ran


def run_counting_steps(work):
    """(what ``await work()`` returns, how many loop steps another task got meanwhile)."""
    others_ran = 0

    async def other() -> None:
        nonlocal others_ran
        while True:
            others_ran += 1
            await trio.lowlevel.checkpoint()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.lowlevel.checkpoint()
            result = await work()
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main), others_ran
