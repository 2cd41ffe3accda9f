"""When each group is cut: earliest deadline first, driven by events, with
breach prediction.

The scheduler runs on the trio thread that also serves FUSE, so its cost
must not grow with the number of disks: it never walks the datastore. The
tracker tells it when a group goes from clean to changed (once per cycle)
and when a group's dirty data passes a bound; the scheduler keeps only the
groups that have something to send, each with O(1) state, and re-evaluates
them when told of a change or at most every RECHECK seconds while any is
waiting.

A group's cycle must commit within its RPO (the smallest of its disks'),
counted from the group's oldest change not yet shipped. It is cut at the
latest at half its RPO, earlier when the measured delivery rate says the
cycle would otherwise not commit in time:

    start by = first change + min(RPO / 2, RPO - expected duration - margin)
    expected duration = dirty bytes / delivery rate + cycle overhead

Groups are shipped in order of that start time (ties: higher priority
first). A breach is predicted, before it happens, when the lag at commit
(time waited + cycles queued ahead + expected duration) would exceed the
RPO, or when the group's dirty data grows faster than the link delivers;
both are logged once per change of state and shown in status and metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from vrfs.settings import Settings, format_value
from vrfs.tracker import Disk, Tracker

log = logging.getLogger("vrfs.scheduler")

RECHECK = 1.0  # seconds between re-evaluations while groups wait
# An urgent group (a new disk's full sync, a failed cycle's blocks) waits this
# long: a disk being created is usually written at once, and one cycle then
# carries its content instead of a first one carrying an empty file.
URGENT_DELAY = 0.5
MARGIN = 0.2  # of the RPO, kept in hand for a cycle's variance
DEFAULT_OVERHEAD = 0.3  # seconds of a cycle besides moving its bytes, until measured
RATE_SAMPLE_MIN = 1 << 20  # cycles smaller than this measure overhead, not rate
EWMA = 0.3
CLEAR_AFTER = 5.0  # seconds a predicted breach must stay out of sight before it is called off (no flapping)


@dataclass
class _Waiting:
    first_change: float  # monotonic
    rpo: float
    priority: int
    urgent: bool = False  # full sync, blocks of a failed cycle: now
    # Urgent already when the connection came (a disk that predates the mount,
    # a cycle the last connection lost): it waited for the link, not for a
    # disk being created, so URGENT_DELAY does not apply.
    waited_for_link: bool = False
    not_before: float = 0.0  # a refused group backs off until then
    dirty_at_check: int = 0
    checked_at: float = 0.0
    dirty_rate: float = 0.0  # bytes/s the group's dirty data grows


class Scheduler:
    def __init__(self, tracker: Tracker, settings: Settings,
                 needs_full_sync: Callable[[Disk], bool] | None = None) -> None:
        self.tracker = tracker
        self.settings = settings
        self._needs_full_sync = needs_full_sync or (lambda d: d.needs_full_sync)
        self._waiting: dict[str, _Waiting] = {}
        self._wake = trio.Event()
        self.rate: float | None = None  # block bytes/s a cycle delivers, measured
        self.overhead = DEFAULT_OVERHEAD
        self.predicted_breach: dict[str, bool] = {}
        self._breach_reason: dict[str, str] = {}
        self._clear_since: dict[str, float] = {}
        self._group_settings: dict[str, tuple[float, int]] = {}
        self._group_settings_key: tuple = ()
        self.decided_at = -RECHECK  # monotonic time of the last due()

    # ------------------------------------------------------------ events

    def changed(self, group: str) -> None:
        """The group has something to send (the tracker calls this when a clean
        group is first written, and when its dirty data passes the bound)."""
        self.consider(group)
        self._wake.set()

    def consider(self, group: str, not_before: float = 0.0) -> None:
        """Look at a group again: wait for it if it has anything to send."""
        g = self.tracker.groups.get(group)
        disks = self.tracker.group_disks(group)
        urgent = any(self._needs_full_sync(d) or d.unacked for d in disks)
        first = g.oldest_change if g is not None else None
        if first is None and not urgent:
            self._waiting.pop(group, None)  # a predicted breach is called off in due(), after CLEAR_AFTER
            return
        rpo, priority = self.group_settings(group, disks)
        now = time.monotonic()
        w = self._waiting.get(group)
        if w is None:
            w = self._waiting[group] = _Waiting(first if first is not None else now, rpo, priority,
                                                checked_at=now)
        w.first_change = first if first is not None else min(w.first_change, now)
        w.rpo, w.priority, w.urgent = rpo, priority, urgent
        w.waited_for_link = w.waited_for_link and urgent  # urgent again later: a new reason, a new wait
        w.not_before = max(w.not_before, not_before) if not_before else w.not_before
        self._wake.set()

    def retry_at(self, group: str, when: float) -> None:
        """The receiver refused the group's cycle: not before `when`."""
        self.consider(group)
        if group in self._waiting:
            self._waiting[group].not_before = when

    def reset(self) -> None:
        """A new connection: every group with anything to send is considered
        (once per connection, not per poll)."""
        self._waiting.clear()
        for name in set(self.tracker.groups) | {d.group for d in self.tracker.disks.values()}:
            self.consider(name)
            w = self._waiting.get(name)
            if w is not None and w.urgent:
                w.waited_for_link = True

    def _urgent_by(self, w: _Waiting, now: float) -> float:
        """When an urgent group is due: at once if it waited for the link,
        else URGENT_DELAY after its first change, or its RPO's start if sooner."""
        return min(self._start_by(w, now), w.first_change + (0.0 if w.waited_for_link else URGENT_DELAY))

    def delivered(self, block_bytes: int, seconds: float) -> None:
        """A cycle committed: learn the delivery rate (large cycles) or the
        per-cycle overhead (small ones)."""
        if seconds <= 0:
            return
        if block_bytes >= RATE_SAMPLE_MIN:
            rate = block_bytes / max(seconds - self.overhead, seconds / 2)
            self.rate = rate if self.rate is None else (1 - EWMA) * self.rate + EWMA * rate
        else:
            self.overhead = (1 - EWMA) * self.overhead + EWMA * min(seconds, 30.0)

    # ------------------------------------------------------------ decisions

    def group_settings(self, group: str, disks: list[Disk] | None = None) -> tuple[float, int]:
        """The group's RPO (the smallest of its disks') and priority (the highest);
        kept until a setting or the namespace changes (status and metrics ask often)."""
        key = (self.settings.version, self.tracker.layout_version)
        if key != self._group_settings_key:
            self._group_settings, self._group_settings_key = {}, key
        found = self._group_settings.get(group)
        if found is None:
            found = self._group_settings[group] = self._settings_of(
                self.tracker.group_disks(group) if disks is None else disks)
        return found

    def _settings_of(self, disks: list[Disk]) -> tuple[float, int]:
        if not disks:
            d = self.settings.defaults
            return float(d["rpo"]), int(d["priority"])
        found = [self.settings.for_disk(disk.disk_id, disk.path) for disk in disks]
        return min(s.rpo for s in found), max(s.priority for s in found)

    def expected_duration(self, dirty: int) -> float:
        return self.overhead + (dirty / self.rate if self.rate else 0.0)

    def due(self, now: float | None = None) -> list[str]:
        """The groups to ship now, earliest deadline first. They stay waiting
        until shipped (`consider` after the attempt drops or keeps them)."""
        now = time.monotonic() if now is None else now
        self.decided_at = now
        ready: list[tuple[float, int, str]] = []
        queued = 0.0  # expected seconds of cycles ahead, for the prediction
        for name, w in sorted(self._waiting.items(), key=lambda kv: self._start_by(kv[1], now)):
            start_by = self._start_by(w, now)
            dirty = self._dirty(name)
            self._rate_of_change(w, dirty, now)
            duration = self.expected_duration(dirty)
            self._predict(name, w, now, queued, duration)
            if now >= w.not_before and now >= (self._urgent_by(w, now) if w.urgent else start_by):
                ready.append((start_by, -w.priority, name))
                queued += duration
        for name in [n for n, on in self.predicted_breach.items() if on and n not in self._waiting]:
            self._predict_clear(name, now)
        return [name for _, _, name in sorted(ready)]

    def evaluate_if_stale(self, now: float | None = None) -> None:
        """Update the rates and predictions of the waiting groups (the same
        work as deciding, without shipping) while a long cycle keeps the
        shipper from deciding: otherwise its own due() runs at least every
        RECHECK, and this does nothing."""
        now = time.monotonic() if now is None else now
        if now - self.decided_at >= RECHECK:
            self.due(now)

    def next_wake(self, now: float | None = None) -> float | None:
        """Seconds until something may be due (None: nothing waits)."""
        if not self._waiting:
            return None
        now = time.monotonic() if now is None else now
        soonest = min(max(self._urgent_by(w, now) if w.urgent else self._start_by(w, now), w.not_before)
                      for w in self._waiting.values())
        return max(0.0, min(soonest - now, RECHECK))

    async def wait(self, limit: float) -> None:
        """Until a group changes, something falls due, or `limit` seconds."""
        wake = self.next_wake()
        timeout = limit if wake is None else min(limit, wake)
        if timeout > 0:
            with trio.move_on_after(timeout):
                await self._wake.wait()
        self._wake = trio.Event()

    def _start_by(self, w: _Waiting, now: float) -> float:
        return w.first_change + min(w.rpo / 2, max(0.0, w.rpo * (1 - MARGIN) - self.expected_duration(
            w.dirty_at_check)))

    def _dirty(self, group: str) -> int:
        g = self.tracker.groups.get(group)
        return g.dirty_bytes if g is not None else 0

    def _rate_of_change(self, w: _Waiting, dirty: int, now: float) -> None:
        elapsed = now - w.checked_at
        if elapsed >= RECHECK:
            grown = max(0, dirty - w.dirty_at_check)
            w.dirty_rate = (1 - EWMA) * w.dirty_rate + EWMA * grown / elapsed
            w.checked_at = now
        w.dirty_at_check = dirty

    def _predict(self, name: str, w: _Waiting, now: float, queued: float, duration: float) -> None:
        lag_at_commit = (now - w.first_change) + queued + duration
        reason = ""
        if self.rate and w.dirty_rate > self.rate:
            reason = (f"its disks change {w.dirty_rate / 1e6:.1f} MB/s, faster than the link delivers "
                      f"({self.rate / 1e6:.1f} MB/s)")
        elif self.rate and lag_at_commit > w.rpo:
            reason = (f"{w.dirty_at_check / 1e6:.1f} MB to send at {self.rate / 1e6:.1f} MB/s: the point would "
                      f"commit {lag_at_commit:.0f} s after its first change")
        was = self.predicted_breach.get(name, False)
        if reason:
            self._clear_since.pop(name, None)
            self._breach_reason[name] = reason
            if not was:
                self.predicted_breach[name] = True
                log.warning("%s: RPO %s will be missed: %s", name, format_value("rpo", w.rpo), reason)
        elif was:
            self._predict_clear(name, now)

    def _predict_clear(self, name: str, now: float) -> None:
        """Each cut resets what is waiting: a prediction is called off only once
        it has stayed clear for a while, not at the first cut."""
        since = self._clear_since.setdefault(name, now)
        if now - since >= CLEAR_AFTER:
            self.predicted_breach[name] = False
            self._clear_since.pop(name, None)
            log.info("%s: RPO %s in reach again", name, format_value("rpo", self.group_settings(name)[0]))

    def breach_reason(self, group: str) -> str:
        return self._breach_reason.get(group, "") if self.predicted_breach.get(group) else ""
