"""The RPO watch: logs, once per change, when a group breaks its RPO ("RPO
violated") and when it keeps it again ("RPO met again").

It runs on the trio thread that also serves FUSE, so it looks only at the
groups that may have changed state, never at every group on a timer:

* a group can turn *violated* only at a time known in advance: its lag
  (vrfs/monitor.py) grows by one second per second, so a group whose lag is
  under its RPO is violated at now + (RPO - lag). That time goes on a heap.
* a group can turn *met* (or its deadline move) only when something happens
  to it: a cycle ends, the tracker reports a change (first write after a
  cut, a failed cycle's blocks given back, a disk created, moved or
  removed), a setting changes, a connection updates the points. Whoever sees
  such an event calls ``touch(group)``.

A wake-up therefore costs O(k log n) for the k groups touched or due, and a
datastore of idle groups costs nothing after the first look at start.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from vrfs.monitor import Monitor

log = logging.getLogger("vrfs.shipper")

# A lag counted on the wall clock (basis "point" or "start") is looked at
# again at least this often: a stepped clock moves it without any event.
WALL_CLOCK_RECHECK = 30.0
# Past the exact instant, so that the lag is strictly over the RPO when looked at.
SLACK = 0.001
# Groups looked at in one loop step; after as many, the watch lets FUSE in
# (a new connection touches every group at once).
SLICE = 64


class RpoWatch:
    def __init__(self, monitor: "Monitor") -> None:
        self.monitor = monitor
        self.violated: dict[str, bool] = {}  # as last logged
        self._deadline_of: dict[str, float] = {}  # group -> monotonic time it turns violated if nothing happens
        self._heap: list[tuple[float, str]] = []  # the same, plus stale entries skipped when popped
        self._touched: set[str] = set()
        self._wake = trio.Event()
        self.looked_at = 0  # groups evaluated so far (a test counts them)

    def touch(self, group: str) -> None:
        """Something happened to the group: look at it soon. Cheap, never
        awaits: the tracker calls this from the write path."""
        self._touched.add(group)
        self._wake.set()

    def next_deadline(self) -> float | None:
        """Monotonic time of the earliest pending deadline, if any."""
        heap = self._heap
        while heap and self._deadline_of.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # superseded
        return heap[0][0] if heap else None

    def check(self, now: float | None = None, limit: int = SLICE) -> bool:
        """Look at up to ``limit`` groups that were touched or whose deadline
        came; True when more wait (the caller yields to the loop first)."""
        now = time.monotonic() if now is None else now
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, group = heapq.heappop(heap)
            if self._deadline_of.get(group) == when:
                del self._deadline_of[group]
                self._touched.add(group)
        batch = sorted(self._touched)[:limit] if len(self._touched) > limit else sorted(self._touched)
        self._touched.difference_update(batch)
        for group in batch:
            self._look_at(group, now)
        return bool(self._touched)

    def _look_at(self, group: str, now: float) -> None:
        self.looked_at += 1
        monitor = self.monitor
        lag, basis = monitor.lag(group)
        rpo = monitor.rpo(group)
        violated = lag > rpo
        if violated or basis == "none":
            self._deadline_of.pop(group, None)  # only an event can change its state now
        else:
            when = now + (rpo - lag) + SLACK
            if basis != "write":
                when = min(when, now + WALL_CLOCK_RECHECK)
            self._schedule(group, when)
        if violated == self.violated.get(group, False):
            return
        self.violated[group] = violated
        if violated:
            shipper = monitor.shipper
            log.warning("%s: RPO violated: the DR site would lose %.0f s of writes (RPO %g s%s)", group, lag,
                        rpo, "" if shipper.connected else f"; {shipper.last_error or 'not connected'}")
        else:
            log.info("%s: RPO met again (lag %.1f s, RPO %g s)", group, lag, rpo)

    def _schedule(self, group: str, when: float) -> None:
        known = self._deadline_of.get(group)
        if known is not None and abs(known - when) < SLACK:
            return  # the same deadline seen again (each touch of a waiting group)
        self._deadline_of[group] = when
        heapq.heappush(self._heap, (when, group))
        if len(self._heap) > 2 * len(self._deadline_of) + 64:  # superseded entries: rebuild, amortized O(1)
            self._heap = [(w, g) for g, w in self._deadline_of.items()]
            heapq.heapify(self._heap)

    async def run(self) -> None:
        """Look at every group once, then only at what is touched or falls due.
        Nothing here may end the task: it runs beside the shipper, in the
        mount that serves the VMs' disks."""
        try:
            self._touched.update(self.monitor.group_names())
        except Exception:
            log.exception("RPO watch: cannot list the groups; it looks at each as it changes")
        while True:
            try:
                more = self.check()
            except Exception:  # a report must never take shipping (or the datastore) down
                log.exception("RPO check failed")
                more = False
            if more:
                await trio.lowlevel.checkpoint()
                continue
            deadline = self.next_deadline()  # on time.monotonic(), which the lag is counted on
            with trio.move_on_after(math.inf if deadline is None else max(0.0, deadline - time.monotonic())):
                await self._wake.wait()
            self._wake = trio.Event()
