"""What an operator is told about the shipper: per group, how much the DR
site would lose now (the lag), whether that breaks the RPO, how fast cycles
go and when the current one (or a full sync's comparison) will be done, and
counters for metrics (vrfs/metrics.py).

The shipper calls ``begin``/``end`` around each cycle and ``scan_started``
when a full sync starts comparing; everything else is computed when asked
(status, a scrape, the RPO watch of vrfs/rpowatch.py), never on the write
path.

The lag is the age of the oldest write that is not in a point the DR site
acknowledged: 0 when nothing was written since the newest acknowledged point.
A cycle in flight does not count as shipped until the receiver commits it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from vrfs.rpowatch import RpoWatch

if TYPE_CHECKING:
    from vrfs.link import Link
    from vrfs.shipper import Shipper
    from vrfs.tracker import Cut, Disk

log = logging.getLogger("vrfs.shipper")

RATE_WINDOW = 10.0  # seconds over which "recent" throughput is measured
SAMPLE_INTERVAL = 0.5  # seconds between samples of a cycle in flight's wire bytes (the rate)


@dataclass
class Flight:
    """One cycle between its cut and its answer."""

    group: str
    cycle_id: int
    link: "Link"
    sent_before: int  # link.bytes_sent when it started
    started: float  # monotonic
    totals: dict["Disk", int]  # block bytes the cycle reads per disk
    shipped: dict["Disk", int]  # block bytes read so far per disk (the shipper's own dict)

    @property
    def wire(self) -> int:
        return self.link.bytes_sent - self.sent_before

    def progress(self, disk: "Disk | None" = None) -> tuple[int, int]:
        """(bytes done, bytes in all) of the cycle, or of one disk's part of it."""
        if disk is not None:
            return self.shipped.get(disk, 0), self.totals.get(disk, 0)
        return sum(self.shipped.values()), sum(self.totals.values())

    def eta(self, disk: "Disk | None" = None) -> float | None:
        done, total = self.progress(disk)
        elapsed = time.monotonic() - self.started
        if done <= 0 or elapsed <= 0:
            return None
        return max(0.0, (total - done) * elapsed / done)


@dataclass
class GroupCounters:
    cycles: int = 0  # acknowledged by the DR site
    errors: int = 0  # failed (link, I/O), not counting shutdown
    refusals: int = 0  # refused by the receiver (CYCLE_REFUSED)
    wire_bytes: int = 0  # bytes on the wire of every finished cycle, acknowledged or not
    samples: deque = field(default_factory=deque)  # (monotonic, cumulative wire bytes) for the rate


class Monitor:
    def __init__(self, shipper: "Shipper") -> None:
        self.shipper = shipper
        self.started_wall = time.time()
        self.groups: dict[str, GroupCounters] = {}
        self.flights: dict[str, Flight] = {}
        self.scans: dict[bytes, float] = {}  # disk_id -> monotonic start of its full-sync comparison
        # Groups that held changes before this process started: when their
        # oldest write happened is not known until their next acknowledged cycle.
        self.unknown_oldest = {d.group for d in shipper.tracker.disks.values()
                               if d.needs_full_sync or d.active or d.unacked}
        self.rpo_watch = RpoWatch(self)  # logs RPO violated / met again, woken by events and deadlines

    def counters(self, group: str) -> GroupCounters:
        c = self.groups.get(group)
        if c is None:
            c = self.groups[group] = GroupCounters()
        return c

    # ------------------------------------------------ hooks of the shipper

    def begin(self, cut: "Cut", cycle_id: int, link: "Link", shipped: dict["Disk", int]) -> Flight:
        totals = {}
        for disk, part in cut.parts.items():
            totals[disk] = min(part.bits.count() * disk.block_size, max(part.size, 0))
        flight = Flight(cut.group, cycle_id, link, link.bytes_sent, time.monotonic(), totals, shipped)
        self.flights[cut.group] = flight
        self._sample(cut.group)
        return flight

    def end(self, flight: Flight, outcome: str) -> None:
        """outcome: committed, refused, error or cancelled."""
        c = self.counters(flight.group)
        c.wire_bytes += flight.wire
        if self.flights.get(flight.group) is flight:
            del self.flights[flight.group]
        if outcome == "committed":
            c.cycles += 1
            self.unknown_oldest.discard(flight.group)
        elif outcome == "refused":
            c.refusals += 1
        elif outcome == "error":
            c.errors += 1
        self._sample(flight.group)
        self.touch(flight.group)  # committed: the lag drops; failed: the oldest write is the group's again
        for disk in flight.totals:
            if not disk.needs_full_sync and disk.last_ack_cycle:
                self.scans.pop(disk.disk_id, None)

    def scan_started(self, disk: "Disk") -> None:
        self.scans[disk.disk_id] = time.monotonic()

    # ------------------------------------------------------- the numbers

    def wire_bytes(self, group: str) -> int:
        """Bytes sent on the wire for the group, the cycle in flight included."""
        flight = self.flights.get(group)
        return self.counters(group).wire_bytes + (flight.wire if flight else 0)

    def _sample(self, group: str) -> None:
        now = time.monotonic()
        samples = self.counters(group).samples
        samples.append((now, self.wire_bytes(group)))
        while len(samples) > 2 and samples[1][0] <= now - RATE_WINDOW:
            samples.popleft()

    def rate(self, group: str) -> float:
        """Bytes per second on the wire for the group over the last ~10 s."""
        self._sample(group)
        samples = self.counters(group).samples
        (t0, b0), (t1, b1) = samples[0], samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 - t0 >= 0.2 else 0.0

    def rpo(self, group: str) -> float:
        """The group's RPO: the strictest of its disks' (vrfs/settings.py)."""
        return self.shipper.scheduler.group_settings(group)[0]

    def lag(self, group: str) -> tuple[float, str]:
        """(seconds the DR site would lose now, how that is known):
        "none" (nothing written since the newest acknowledged point), "write"
        (the oldest such write), "point" (conservatively, the cut time of the
        newest acknowledged point), "start" (neither is known: since this
        daemon started, a lower bound)."""
        tracker = self.shipper.tracker
        disks = tracker.group_disks(group)
        oldest = tracker.group(group).oldest_change
        for disk in disks:
            if disk.cut is not None and disk.cut.oldest_change is not None:  # in flight: not shipped yet
                oldest = disk.cut.oldest_change if oldest is None else min(oldest, disk.cut.oldest_change)
        point = self.shipper.points.get(group) or {}
        cut_time = point.get("cut_time")
        unknown = group in self.unknown_oldest or (
            oldest is None and any(d.cut is not None or d.needs_full_sync or d.active or d.unacked for d in disks))
        if unknown:
            if cut_time:
                return max(0.0, time.time() - cut_time), "point"
            return max(0.0, time.time() - self.started_wall), "start"
        if oldest is None:
            return 0.0, "none"
        return max(0.0, time.monotonic() - oldest), "write"

    def point_age(self, group: str) -> float | None:
        cut_time = (self.shipper.points.get(group) or {}).get("cut_time")
        return max(0.0, time.time() - cut_time) if cut_time else None

    def group_names(self) -> list[str]:
        return sorted(set(self.shipper.tracker.group_names()) | set(self.shipper.points))

    def group_info(self, group: str) -> dict:
        """Group-level values for status and metrics (the counters are in ``counters(group)``)."""
        lag, basis = self.lag(group)
        rpo = self.rpo(group)
        flight = self.flights.get(group)
        info = {
            "lag_seconds": round(lag, 3),
            "lag_basis": basis,
            "rpo_seconds": rpo,
            "rpo_violated": lag > rpo,
            "rpo_breach_predicted": bool(self.shipper.predicted_breach.get(group, False)),
            "point_age_seconds": _round(self.point_age(group)),
            "rate_bytes_per_second": round(self.rate(group), 1),
            "eta_seconds": _round(flight.eta() if flight else None),
        }
        if flight is not None:
            done, total = flight.progress()
            info["cycle"] = {"id": flight.cycle_id, "bytes": total, "bytes_done": done,
                             "seconds": round(time.monotonic() - flight.started, 3)}
        return info

    def disk_info(self, disk: "Disk") -> dict:
        """What a full sync of the disk has done and has left: the comparison, then its cycle."""
        info: dict = {}
        flight = self.flights.get(disk.group)
        if flight is not None and disk in flight.totals:
            done, total = flight.progress(disk)
            info["cycle_progress"] = round(done / total, 4) if total else 1.0
            info["cycle_eta_seconds"] = _round(flight.eta(disk))
        if disk.sync_progress is not None and disk.sync_progress < 1.0 and flight is None:
            info["sync_phase"] = "comparing"
            started = self.scans.get(disk.disk_id)
            if started is not None and disk.sync_progress > 0:
                elapsed = time.monotonic() - started
                info["eta_seconds"] = round(elapsed * (1 - disk.sync_progress) / disk.sync_progress, 1)
        elif disk.sync_progress is not None and "cycle_progress" in info:
            info["sync_phase"] = "sending"
            info["eta_seconds"] = info["cycle_eta_seconds"]
        return info

    # ------------------------------------------------------ the watch

    def touch(self, group: str) -> None:
        """Something happened to the group that may change its RPO state."""
        self.rpo_watch.touch(group)

    def sample_flights(self) -> None:
        """Between two cycles a group's wire bytes stand still, so only a
        group with a cycle in flight needs samples for its ~10 s rate; and
        the scheduler predicts on its own unless a long cycle keeps it from
        deciding."""
        self.shipper.scheduler.evaluate_if_stale()
        for group in list(self.flights):
            self._sample(group)

    async def watch(self) -> None:
        """The RPO watch (vrfs/rpowatch.py), and the rates of cycles in flight."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.rpo_watch.run)
            while True:
                try:
                    self.sample_flights()
                except Exception:  # a report must never take shipping (or the datastore) down
                    log.exception("sampling the cycles in flight failed")
                await trio.sleep(SAMPLE_INTERVAL)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
