"""Online verification: does the DR site hold exactly what the source held at
its newest point? (`vrfs verify`, and the mount's periodic `--verify-every`.)

The comparison needs no copy-on-write and no pause of the VMs. The shipper
runs it one chunk at a time between cycles, on its own task, so no cycle of
the group is applied while a chunk is compared. At that moment every block
that is clean in the tracker (neither in the active bitmap nor in an
unacknowledged cycle) holds, at the source, what it held at the group's
newest acknowledged cut, and the replica is at that cut: the two must hash
the same. A block that is dirty (written since the cut, even while it was
being read: the tracker marks before the backing write) is skipped; the next
cycle carries it anyway.

Differing blocks are reported per disk; with repair they are marked dirty, so
the next ordinary cycle, consistent like every other, ships them. A replica
that is missing, or is not the one this disk built (another disk's, a seed),
makes the disk need a full sync instead.

The job survives a restart of the mount: its position and findings are kept
in ``.vrfs/verify.json`` (after each chunk, at most every few seconds), and
`vrfs verify` with the same groups and repair flag resumes it.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field

import trio

from vrfs.cycle import DiskEntry
from vrfs.durable import write_atomically
from vrfs.link import Link
from vrfs.store.base import Copy, hash_blocks
from vrfs.tracker import Disk, Tracker

log = logging.getLogger("vrfs.verify")

STATE_FILE = "verify.json"
CHUNK_BYTES = 32 << 20  # compared per step; the shipper ships due groups between steps
SAVE_EVERY = 5.0  # seconds between saves of the job's position
MAX_RANGES = 1000  # differing block ranges kept per disk (all are counted)


@dataclass
class DiskResult:
    path: str
    group: str
    blocks: int = 0  # of the disk
    compared: int = 0
    skipped: int = 0  # written since the point: the next cycle carries them
    differing: int = 0
    ranges: list[list[int]] = field(default_factory=list)  # [first, stop) of differing blocks
    state: str = "pending"  # pending, ok, differs, missing, not-checked
    note: str = ""
    point: int = 0  # the group's point the replica was compared at (a repair lands after it)

    def add_differing(self, index: int) -> None:
        self.differing += 1
        if self.ranges and self.ranges[-1][1] == index:
            self.ranges[-1][1] = index + 1
        elif len(self.ranges) < MAX_RANGES:
            self.ranges.append([index, index + 1])


@dataclass
class Job:
    id: str
    groups: list[str]  # empty: every group
    repair: bool
    rate: int  # bytes per second of source data read; 0: unlimited
    started: float
    finished: float | None = None
    paused: bool = False
    periodic: bool = False
    position: dict[str, int] = field(default_factory=dict)  # disk_id hex -> next block
    results: dict[str, DiskResult] = field(default_factory=dict)  # disk_id hex ->
    bytes_compared: int = 0
    bytes_total: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> Job:
        results = {k: DiskResult(**v) for k, v in obj.pop("results", {}).items()}
        return cls(**obj, results=results)

    def summary(self) -> dict:
        states = [r.state for r in self.results.values()]
        return {
            "id": self.id, "groups": self.groups, "repair": self.repair, "rate": self.rate,
            "started": self.started, "finished": self.finished, "paused": self.paused,
            "periodic": self.periodic,
            "progress": (self.bytes_compared / self.bytes_total if self.bytes_total
                         else 1.0 if self.finished else 0.0),
            "bytes_compared": self.bytes_compared, "bytes_total": self.bytes_total,
            "disks": {r.path: asdict(r) for r in self.results.values()},
            "result": _verdict(states) if self.finished else "running",
        }


def _verdict(states: list[str]) -> str:
    if any(s in ("differs", "missing") for s in states):
        return "differs"
    if any(s == "not-checked" for s in states):
        return "incomplete"
    return "ok"


class Verifier:
    def __init__(self, tracker: Tracker, root_fd: int, vrfs_fd: int, limiter: trio.CapacityLimiter,
                 every: float | None = None) -> None:
        self.tracker = tracker
        self.root_fd = root_fd
        self.vrfs_fd = vrfs_fd
        self.limiter = limiter
        self.every = every  # periodic verify interval, seconds; None: off
        self.job: Job | None = None
        self.last: dict | None = None  # summary of the last finished job
        self.findings: dict[str, dict] = {}  # disk_id hex -> what the last verify that covered it found
        self._next_at = 0.0
        self._saved_at = 0.0
        self._load()

    # ------------------------------------------------------------- control

    def start(self, groups: list[str], repair: bool, rate: int, *, periodic: bool = False) -> dict:
        """Start a job, or resume the one with the same groups and repair flag."""
        job = self.job
        if job is not None and job.finished is None and sorted(job.groups) == sorted(groups) \
                and job.repair == repair:
            job.paused, job.rate = False, rate
            log.info("verify %s resumed at %.0f%%", job.id, 100 * job.bytes_compared / max(job.bytes_total, 1))
            return {"job": job.id, "resumed": True}
        if job is not None and job.finished is None:
            log.warning("verify %s abandoned for a new one", job.id)
        known = {d.group for d in self.tracker.disks.values()}
        unknown = [g for g in groups if g not in known]
        if unknown:
            return {"error": f"no such group in this datastore: {', '.join(unknown)}"}
        self.job = Job(uuid.uuid4().hex[:12], sorted(groups), repair, rate, time.time(), periodic=periodic)
        self._plan(self.job)
        log.info("verify %s started: %s, %s", self.job.id, ", ".join(groups) or "every group",
                 "repairing" if repair else "reporting only")
        return {"job": self.job.id, "resumed": False}

    def pause(self) -> None:
        if self.job is not None and self.job.finished is None:
            self.job.paused = True

    async def save(self) -> None:
        """Keep the job's position and findings (a write and an fsync: off the trio thread)."""
        await trio.to_thread.run_sync(self._save, limiter=self.limiter)

    def status(self) -> dict:
        current = self.job.summary() if self.job is not None else None
        return {"current": current, "last": self.last, "every": self.every}

    def disk_summary(self, disk: Disk) -> dict | None:
        """What the last verify that covered this disk found, for `vrfs status`."""
        return self.findings.get(disk.disk_id.hex())

    # ---------------------------------------------------------------- work

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.finished is None and not self.job.paused

    def ready(self) -> bool:
        """A chunk may run now (the shipper need not sleep before the next step)."""
        return self.busy and time.monotonic() >= self._next_at

    async def step(self, link: Link) -> None:
        """One chunk of the current job (or start a periodic one); called by
        the shipper between cycles."""
        now = time.monotonic()
        if not self.busy:
            if self.every and self._periodic_due():
                self.start([], True, 0, periodic=True)
                await self.save()
            return
        if now < self._next_at:
            return  # rate limit
        job = self.job
        assert job is not None
        work = self._next_disk(job)
        if work is None:
            self._finish(job)
            await self.save()
            return
        disk, result = work
        try:
            nbytes = await self._chunk(link, job, disk, result)
        except OSError as exc:  # the source file went away or cannot be read: this disk only
            result.state, result.note = "not-checked", f"cannot read it: {exc.strerror or exc}"
            return
        job.bytes_compared += nbytes
        if job.rate:
            self._next_at = time.monotonic() + nbytes / job.rate
        if time.monotonic() - self._saved_at > SAVE_EVERY:
            await self.save()

    def _plan(self, job: Job) -> None:
        for disk in sorted(self.tracker.disks.values(), key=lambda d: d.path):
            if job.groups and disk.group not in job.groups:
                continue
            blocks = disk.size // disk.block_size + (1 if disk.size % disk.block_size else 0)
            job.results[disk.disk_id.hex()] = DiskResult(disk.path, disk.group, blocks)
            job.position[disk.disk_id.hex()] = 0
            job.bytes_total += disk.size

    def _next_disk(self, job: Job) -> tuple[Disk, DiskResult] | None:
        by_id = {d.disk_id.hex(): d for d in self.tracker.disks.values()}
        for key, result in job.results.items():
            if result.state != "pending":
                continue
            disk = by_id.get(key)
            if disk is None:
                result.state, result.note = "not-checked", "deleted at the source during the verify"
                continue
            result.path, result.group = disk.path, disk.group
            if disk.needs_full_sync or disk.full_sync_scanned or disk.last_ack_cycle == 0:
                result.state, result.note = "not-checked", "a full sync is pending; it compares every block"
                continue
            return disk, result
        return None

    async def _chunk(self, link: Link, job: Job, disk: Disk, result: DiskResult) -> int:
        key = disk.disk_id.hex()
        bs = disk.block_size
        first = job.position.get(key, 0)
        count = max(1, CHUNK_BYTES // bs)
        size = os.stat(disk.path, dir_fd=self.root_fd, follow_symlinks=False).st_size
        ours_total = -(-size // bs)
        entry = DiskEntry(disk.disk_id, disk.path, size, bs)
        # Both sites hash at once: ours in a worker thread while the DR site's
        # digests are on their way.
        ours: list[bytes | None] = []

        async def hash_ours() -> None:
            ours.extend(await trio.to_thread.run_sync(self._hash_ours, disk, size, first,
                                                      min(first + count, ours_total) - first, limiter=self.limiter))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hash_ours)
            theirs = await link.fetch_hashes(disk.group, entry, first, count)
        result.point = link.points.get(disk.group, 0)
        expected = f"disk:{key}:"
        if theirs is None or not theirs.basis.startswith(expected):
            what = "missing" if theirs is None else "not this disk's replica"
            result.state, result.note = "missing", f"the DR site's copy is {what}"
            log.warning("verify: %s: the DR site's copy is %s", disk.path, what)
            if job.repair:
                disk.mark_full(f"verify: the DR site's copy is {what}")
                self.tracker.note_change(disk.group)
            return 0
        theirs_total = -(-theirs.size // bs)
        stop = min(first + count, max(ours_total, theirs_total))
        differing = []
        for k in range(stop - first):
            index = first + k
            if disk.active.test(index) or disk.unacked.test(index):
                result.skipped += 1  # written since the point: the next cycle carries it
                continue
            mine = ours[k] if k < len(ours) else None
            other = theirs.digests[k] if k < len(theirs.digests) else None
            result.compared += 1
            if mine != other:
                result.add_differing(index)
                differing.append(index)
        if differing:
            log.warning("verify: %s: %d blocks from %d differ at the DR site", disk.path, len(differing), first)
            if job.repair:
                for index in differing:
                    disk.active.set(index)
                disk.changed = True
                self.tracker.note_change(disk.group)
        job.position[key] = stop
        if stop >= max(ours_total, theirs_total):
            if size != theirs.size and self.tracker.group(disk.group).oldest_change is None \
                    and not disk.active.count() and not disk.unacked.count():
                result.note = f"size {theirs.size} at the DR site, {size} here"
                result.add_differing(ours_total)
                if job.repair:
                    disk.mark_full(f"verify: {result.note}")
                    self.tracker.note_change(disk.group)
            result.state = "differs" if result.differing else "ok"
        return (stop - first) * bs

    def _hash_ours(self, disk: Disk, size: int, first: int, count: int) -> list[bytes | None]:
        if count <= 0:
            return []
        fd = os.open(disk.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self.root_fd)
        try:
            return hash_blocks(Copy(fd, size, sparse=True), disk.block_size, first, count)
        finally:
            os.close(fd)

    def _finish(self, job: Job) -> None:
        job.finished = time.time()
        self.last = job.summary()
        for key, result in job.results.items():
            self.findings[key] = {"state": result.state, "differing": result.differing, "finished": job.finished}
        log.info("verify %s finished: %s", job.id, self.last["result"])

    def _periodic_due(self) -> bool:
        last = self.last["finished"] if self.last else None
        return last is None or time.time() - last >= (self.every or 0)

    # --------------------------------------------------------- persistence

    def _save(self) -> None:
        self._saved_at = time.monotonic()
        state = {"job": self.job.to_json() if self.job else None, "last": self.last, "findings": self.findings}
        try:
            write_atomically(self.vrfs_fd, STATE_FILE, json.dumps(state).encode())
        except OSError as exc:  # losing the position costs a restart of the job, nothing more
            log.warning("cannot save the verify's position: %s", exc)

    def _load(self) -> None:
        try:
            fd = os.open(STATE_FILE, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.vrfs_fd)
            with os.fdopen(fd) as f:
                state = json.load(f)
            self.last = state.get("last")
            self.findings = dict(state.get("findings") or {})
            if state.get("job"):
                self.job = Job.from_json(state["job"])
                self.job.paused = self.job.paused or not self.job.periodic
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("ignoring a damaged %s: %s", STATE_FILE, exc)
            self.job, self.last = None, None
