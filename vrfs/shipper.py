"""The shipper: decides when each group cuts, runs full syncs, reads the
cycle's blocks and hands them to the link; reconnects with backoff.

The datastore never waits for the shipper: while the peer is unreachable,
writes are tracked as usual and go with the next cycle that arrives.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import trio

from vrfs.allocator import keep_large_buffers
from vrfs.bwlimit import Schedule, TokenBucket
from vrfs.cycle import MAX_HISTORY, CycleHeader, DiskEntry
from vrfs.layout import GENERATIONS_FILE, LINEAGE_FILE
from vrfs.link import CycleRefused, Link, LinkError
from vrfs.monitor import Monitor
from vrfs.scheduler import Scheduler
from vrfs.settings import Settings
from vrfs.tls import ClientTls
from vrfs.durable import write_atomically
from vrfs.store.base import Copy, data_extents, hash_blocks
from vrfs.tracker import Cut, Disk, Tracker
from vrfs.wire import Block

if TYPE_CHECKING:
    from vrfs.verify import Verifier

log = logging.getLogger("vrfs.shipper")

READ_CHUNK = 4 << 20  # bytes read per worker-thread call
PEER_FILE = "peer.json"
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
FENCED_RETRY = 60.0  # seconds between tries of a group that the DR site fenced (failed over)
IDLE_CHECK = 1.0  # seconds without a cycle after which the shipper checks that the link is still up


class Shipper:
    def __init__(self, tracker: Tracker, root_fd: int, vrfs_fd: int, peer: tuple[str, int],
                 name: str, rpo: float, zstd_level: int = 1, congestion: str = "cubic",
                 limiter: trio.CapacityLimiter | None = None, verifier: "Verifier | None" = None,
                 *, tls: ClientTls, settings: Settings | None = None, bwlimit: Schedule | None = None) -> None:
        keep_large_buffers()  # reads and frames of 2-4 MiB, one after another (vrfs/allocator.py)
        self.tracker = tracker
        # Per-disk RPO, compression and priority (vrfs/settings.py); rpo and
        # zstd_level are the mount's defaults.
        self.settings = settings or Settings({"rpo": rpo, "compression": zstd_level})
        self.scheduler = Scheduler(tracker, self.settings,
                                   needs_full_sync=lambda d: self._needs_scan(d) or d.needs_full_sync)
        tracker.change_listener = self._group_changed
        self.predicted_breach = self.scheduler.predicted_breach  # group -> a breach of its RPO is predicted
        # One bucket for every connection: a reconnect brings no fresh burst.
        self.bwlimit = TokenBucket(bwlimit) if bwlimit is not None and bwlimit.limited else None
        self.tls = tls
        self.security = ""  # how the current link is authenticated, for status
        self.verifier = verifier
        self.root_fd = root_fd
        self.vrfs_fd = vrfs_fd
        self.peer = peer
        self.name = name
        self.rpo = rpo
        self.zstd_level = zstd_level
        self.congestion = congestion
        self.limiter = limiter or trio.CapacityLimiter(2)
        self.connected = False
        self.last_error = ""
        self.points: dict[str, dict] = {}  # group -> {"id", "cut_time"} of its newest acknowledged point
        self.bytes_sent: dict[bytes, int] = {}  # disk_id -> wire bytes
        self.bytes_shipped: dict[bytes, int] = {}  # disk_id -> block bytes before compression
        # Groups whose last cycle the receiver refused: (monotonic time of the
        # next try, current backoff, reason). Only that group waits.
        self.refused: dict[str, tuple[float, float, str]] = {}
        self.fenced: dict[str, str] = {}  # group -> "fenced" (failed over there) or "diverged" (split brain)
        self.store_id = self._load_peer()
        self.lineage = self._load_lineage()  # disk_id -> the point a failover started it from
        self.generations = self._load_generations()  # disk_id -> its generations, when a failover made more
        # group -> the scheduler foresees that the group will miss its RPO (status, metrics); absent: no.
        self.monitor = Monitor(self)  # lag, rate, ETA and counters for status and metrics (vrfs/monitor.py)

    # ------------------------------------------------------------ events

    def _group_changed(self, group: str) -> None:
        """The tracker's news (a group changed, passed its dirty bound, got a
        failed cycle's blocks back): for the scheduler and the RPO watch."""
        self.scheduler.changed(group)
        self.monitor.touch(group)

    def setting_changed(self, group: str) -> None:
        """A disk's RPO or priority changed: its group's deadline may move."""
        self.scheduler.consider(group)
        self.monitor.touch(group)

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        backoff = BACKOFF_MIN
        host, port = self.peer
        while True:
            try:
                link = await Link.connect(host, port, self.name, tls=self.tls, zstd_level=self.zstd_level,
                                          congestion=self.congestion, bwlimit=self.bwlimit)
            except LinkError as exc:
                self._down(f"cannot reach {host}:{port}: {exc}")
            else:
                self.connected, self.last_error, backoff = True, "", BACKOFF_MIN
                self.security = link.security.describe()
                log.info("connected to %s:%d (store %s, %s)", host, port, link.store_id, self.security)
                try:
                    await self._session(link)
                except LinkError as exc:
                    self._down(f"link to {host}:{port} failed: {exc}")
                except Exception as exc:  # shipping must never take the datastore down
                    log.exception("shipping failed")
                    self._down(f"shipping failed: {type(exc).__name__}: {exc}")
                finally:
                    with trio.CancelScope(shield=True):
                        await link.aclose()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max())

    def _backoff_max(self) -> float:
        """The longest wait between two connection attempts: a quarter of the
        mount's RPO, within [BACKOFF_MIN, BACKOFF_MAX], so that a link that
        comes back (a healed partition, a restarted receiver) is found again
        well within the RPO. Refusals of one group back off on their own."""
        return max(BACKOFF_MIN, min(BACKOFF_MAX, self.rpo / 4))

    def _down(self, reason: str) -> None:
        if reason != self.last_error:
            log.warning("%s; retrying with backoff, changes stay tracked", reason)
        self.connected, self.last_error = False, reason

    async def _session(self, link: Link) -> None:
        if link.store_id != self.store_id:
            if self.store_id:
                log.warning("the receiver's store changed (%s -> %s): full sync of every disk",
                            self.store_id, link.store_id)
            for disk in self.tracker.disks.values():
                disk.last_ack_cycle = 0
                disk.changed = True
            self.store_id = link.store_id
            await trio.to_thread.run_sync(self._save_peer)
        for group, point in link.points.items():
            if group not in self.points or self.points[group]["id"] != point:
                self.points[group] = {"id": point, "cut_time": None}
        for group, ids in link.resync.items():
            self._resync(group, ids, "the DR site's replica is missing or damaged")
        # Every group ships its namespace once per connection, changed or not:
        # what changed while nothing was tracking (files deleted or replaced
        # while unmounted, a disk found again under a name in another group)
        # reaches the DR site even for a group without a write, or without disks.
        for group in set(link.points) | {d.group for d in self.tracker.disks.values()}:
            self.tracker.note_change(group)
        for disk in self.tracker.disks.values():
            if disk.last_ack_cycle > link.points.get(disk.group, 0):
                log.warning("%s: the receiver lost points (has %d, had acknowledged %d): full sync",
                            disk.path, link.points.get(disk.group, 0), disk.last_ack_cycle)
                disk.last_ack_cycle = 0
                disk.full_sync_scanned = False
        self.scheduler.reset()
        idle_since = time.monotonic()
        while True:
            due = self.scheduler.due()
            for name in due:
                try:
                    await self._ship_group(link, name)
                except OSError as exc:  # this group's files; the others still ship
                    log.warning("%s: cannot ship now: %s", name, exc)
                    self.scheduler.retry_at(name, time.monotonic() + BACKOFF_MIN)
                else:
                    self.scheduler.consider(name)  # written meanwhile, or refused: it waits again
            verifying = self.verifier is not None and self.verifier.busy
            if self.verifier is not None:
                await self.verifier.step(link)  # one chunk, between cycles: see vrfs/verify.py
            if due or verifying:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= IDLE_CHECK:
                await link.check_alive()
                idle_since = time.monotonic()
            if self.verifier is not None and self.verifier.ready():
                await trio.lowlevel.checkpoint()
            else:  # until a group changes or falls due, or the idle link wants checking
                limit = max(0.05, IDLE_CHECK - (time.monotonic() - idle_since))
                if self.verifier is not None and self.verifier.busy:
                    limit = min(limit, 0.1)  # a rate-limited verify's next chunk
                await self.scheduler.wait(limit)

    def _needs_scan(self, disk: Disk) -> bool:
        return (disk.needs_full_sync or disk.last_ack_cycle == 0) and not disk.full_sync_scanned

    def _resync(self, group: str, ids: set[bytes], reason: str) -> None:
        """The receiver cannot build on these disks' replicas: compare them again."""
        for disk in self.tracker.group_disks(group):
            if disk.disk_id in ids:
                log.warning("%s: %s: full sync", disk.path, reason)
                disk.mark_full(reason)
                self.tracker.note_change(group)

    # -------------------------------------------------------- one group

    async def _ship_group(self, link: Link, name: str) -> None:
        while True:
            for disk in self.tracker.group_disks(name):
                if self._needs_scan(disk):
                    await self._full_sync_scan(link, disk)
            cut = await self.tracker.cut(name, self._open_for_cut)
            if not any(self._needs_scan(d) for d in cut.parts):
                break
            self.tracker.failed(cut)  # a disk came or moved in during the scans: compare it first
        cycle_id = link.points.get(name, 0) + 1
        entries = tuple(DiskEntry(d.disk_id, d.path, p.size, d.block_size, self._history(d))
                        for d, p in cut.parts.items())
        full_sync = {d.disk_id: p.basis for d, p in cut.parts.items() if p.full_sync}
        header = CycleHeader(name, cycle_id, cut.cut_time, entries, full_sync)
        sent_before = link.bytes_sent
        shipped = {d: 0 for d in cut.parts}
        started = time.monotonic()
        # The group's compression setting is the ceiling of its cycle (vrfs/compression.py).
        link.compression.set_ceiling(min(self.settings.for_disk(d.disk_id, d.path).compression
                                          for d in cut.parts) if cut.parts else self.zstd_level)
        flight = self.monitor.begin(cut, cycle_id, link, shipped)
        try:
            await link.send_cycle(header, self._blocks(cut, shipped))
        except CycleRefused as refusal:
            self.monitor.end(flight, "refused")
            self.tracker.failed(cut)
            self._refused(name, refusal)
            return
        except BaseException as exc:
            if link.points.get(name, 0) >= cycle_id:  # committed; only the answer was lost
                self.monitor.end(flight, "committed")
                self._acknowledge(cut, cycle_id, shipped, 0)
            else:
                self.monitor.end(flight, "error" if isinstance(exc, Exception) else "cancelled")
                self.tracker.failed(cut)
            raise
        self.monitor.end(flight, "committed")
        self.refused.pop(name, None)
        self.fenced.pop(name, None)
        self.scheduler.delivered(sum(shipped.values()), time.monotonic() - started)
        self._acknowledge(cut, cycle_id, shipped, link.bytes_sent - sent_before)

    def _refused(self, name: str, refusal: CycleRefused) -> None:
        """One group's cycle was refused: its blocks stay dirty, the disks the
        receiver cannot build on are compared again, and the group alone
        backs off (at once when a full sync is what it needs)."""
        if refusal.fenced:
            backoff = FENCED_RETRY  # failed over there: ask again rarely, log once
        elif refusal.resync:
            self._resync(name, refusal.resync, f"refused by the DR site: {refusal}")
            backoff = 0.0
        else:
            backoff = min(max(self.refused.get(name, (0.0, BACKOFF_MIN / 2, ""))[1] * 2, BACKOFF_MIN),
                          BACKOFF_MAX)
        previous = self.refused.get(name, (0.0, 0.0, ""))[2]
        if str(refusal) != previous:
            log.warning("%s: cycle refused by the receiver: %s%s", name, refusal,
                        f"; retrying in {backoff:g} s" if backoff else "")
        self.refused[name] = (time.monotonic() + backoff, backoff, str(refusal))
        self.scheduler.retry_at(name, time.monotonic() + backoff)
        if refusal.fenced:
            self.fenced[name] = "diverged" if refusal.diverged else "fenced"

    def _acknowledge(self, cut: Cut, cycle_id: int, shipped: dict[Disk, int], wire: int) -> None:
        total = sum(shipped.values()) or 1
        for disk, nbytes in shipped.items():
            self.bytes_shipped[disk.disk_id] = self.bytes_shipped.get(disk.disk_id, 0) + nbytes
            share = wire * nbytes // total if total else 0
            self.bytes_sent[disk.disk_id] = self.bytes_sent.get(disk.disk_id, 0) + share
            disk.full_sync_scanned = False
            disk.sync_progress = None
        self.points[cut.group] = {"id": cycle_id, "cut_time": cut.cut_time}
        self.tracker.acknowledged(cut, cycle_id)
        log.info("%s: point %d committed (%d block bytes, %d bytes on the wire)", cut.group, cycle_id,
                 sum(shipped.values()), wire)

    def _open_for_cut(self, disk: Disk) -> int:
        return os.open(disk.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self.root_fd)

    async def _blocks(self, cut: Cut, shipped: dict[Disk, int]) -> AsyncIterator[tuple[int, int, Block | None]]:
        """The cycle's blocks in disk order, read in chunks off the trio thread,
        as runs of consecutive blocks (Link.send_cycle)."""
        for index, (disk, part) in enumerate(list(cut.parts.items())):
            bs = disk.block_size
            limit = (part.size + bs - 1) // bs
            wanted = [i for i in part.bits if i < limit]
            runs = []  # (first block, count): a run of consecutive blocks is one pread
            pos = 0
            while pos < len(wanted):
                run_end = pos + 1
                while (run_end < len(wanted) and wanted[run_end] == wanted[run_end - 1] + 1
                       and (run_end - pos) * bs < READ_CHUNK):
                    run_end += 1
                runs.append((wanted[pos], run_end - pos))
                pos = run_end
            for r, (first, count) in enumerate(runs):
                following = (runs[r + 1][0] * bs, runs[r + 1][1] * bs) if r + 1 < len(runs) else None
                data = await trio.to_thread.run_sync(_pread_ahead, part.fd, count * bs, first * bs, following,
                                                     limiter=self.limiter)
                for start, piece in _as_of_cut(cut, disk, part.size, first, count, data):
                    shipped[disk] += len(piece)
                    yield index, start, piece

    # --------------------------------------------------------- full sync

    async def _full_sync_scan(self, link: Link, disk: Disk) -> None:
        """Compare every block with the receiver's copy; mark the ones that
        differ. Writes meanwhile are tracked as usual; the next cycle carries
        both and completes the full sync.

        Both sides hash at once: the receiver's hashes are fetched while ours
        are computed. If the receiver has no copy, hashing is pointless: every
        block that holds data (SEEK_DATA) is marked, and all-zero ones among
        them travel as zero records."""
        st = os.stat(disk.path, dir_fd=self.root_fd, follow_symlinks=False)
        disk.scanned_size = st.st_size
        entry = DiskEntry(disk.disk_id, disk.path, st.st_size, disk.block_size)
        total = entry.block_count
        disk.sync_progress = 0.0
        self.monitor.scan_started(disk)
        point = self.lineage.get(disk.disk_id)
        if point is not None and not disk.needs_full_sync:
            # This disk started at a point of its own replica's lineage (a
            # failover) and its tracking since is whole: if the DR site holds
            # a copy at that very point, the blocks changed on either side are
            # all that can differ, and nothing needs hashing.
            theirs = await link.fetch_hashes(disk.group, entry, lineage_point=point)
            if theirs is not None and theirs.dirty is not None:
                # Ours ship anyway; theirs (a superset: whole hot extents) are
                # compared, and only those that differ are marked.
                candidates = [i for i in theirs.dirty if i < total and not disk.active.test(i)]
                differing = await self._compare_blocks(link, disk, entry, candidates)
                disk.basis = theirs.basis
                self._scanned(disk)
                log.info("%s: full sync from point %d: %d blocks changed here, %d of %d changed there differ",
                         disk.path, point, disk.active.count() - differing, differing, len(candidates))
                return
        log.info("%s: full sync: comparing %d blocks", disk.path, total)
        fd = self._open_for_cut(disk)
        copy = Copy(fd=fd, size=st.st_size, sparse=True)
        ours: list[bytes | None] = []
        theirs = None
        try:
            async with trio.open_nursery() as nursery:
                async def hash_ours() -> None:
                    per_call = max(1, READ_CHUNK // disk.block_size)
                    while len(ours) < total:
                        count = min(per_call, total - len(ours))
                        ours.extend(await trio.to_thread.run_sync(
                            hash_blocks, copy, disk.block_size, len(ours), count, limiter=self.limiter))
                        disk.sync_progress = len(ours) / total

                nursery.start_soon(hash_ours)
                theirs = await link.fetch_hashes(disk.group, entry)
                if theirs is None:
                    nursery.cancel_scope.cancel()
            if theirs is None:
                differing = 0
                for start, end in await trio.to_thread.run_sync(data_extents, fd, 0, st.st_size):
                    first, stop = start // disk.block_size, -(-end // disk.block_size)
                    disk.active.set_range(first, stop)
                    differing += stop - first
            else:
                differing = 0
                digests = theirs.digests
                for i, h in enumerate(ours):
                    if h != (digests[i] if i < len(digests) else None):
                        disk.active.set(i)
                        differing += 1
        finally:
            os.close(fd)
        disk.basis = theirs.basis if theirs is not None else None
        self._scanned(disk)
        log.info("%s: full sync: %d of %d blocks %s", disk.path, differing, total,
                 "hold data (no copy at the DR site)" if theirs is None else "differ")

    async def _compare_blocks(self, link: Link, disk: Disk, entry: DiskEntry, blocks: list[int]) -> int:
        """Compare only ``blocks`` (ascending) with the receiver's copy, a run at a time; mark those that differ."""
        differing = 0
        fd = self._open_for_cut(disk)
        try:
            copy = Copy(fd=fd, size=entry.size, sparse=True)
            pos = 0
            while pos < len(blocks):
                end = pos + 1
                while end < len(blocks) and blocks[end] - blocks[end - 1] <= 8 and blocks[end] - blocks[pos] < 4096:
                    end += 1
                first, count = blocks[pos], blocks[end - 1] - blocks[pos] + 1
                theirs = await link.fetch_hashes(disk.group, entry, first, count)
                ours = await trio.to_thread.run_sync(hash_blocks, copy, disk.block_size, first, count,
                                                     limiter=self.limiter)
                digests = theirs.digests if theirs is not None else []
                for index in blocks[pos:end]:
                    k = index - first
                    if ours[k] != (digests[k] if k < len(digests) else None):
                        disk.active.set(index)
                        differing += 1
                pos = end
        finally:
            os.close(fd)
        return differing

    def _scanned(self, disk: Disk) -> None:
        disk.sync_progress = 1.0
        disk.changed = True
        disk.full_sync_scanned = True
        self.tracker.note_change(disk.group)

    # ----------------------------------------------------------- status

    def group_info(self, group: str) -> dict:
        """What every disk of the group shows alike (vrfs/monitor.py), computed once per group."""
        info = self.monitor.group_info(group)
        reason = self.scheduler.breach_reason(group)
        if reason:
            info["prediction"] = f"RPO will be missed: {reason}"
        return info

    def describe(self, disk: Disk, group_info: dict | None = None) -> dict:
        """The disk's replication state; ``group_info`` is ``self.group_info(disk.group)``
        when the caller has it already (status asks for every disk of a group)."""
        point = self.points.get(disk.group)
        refused = self.refused.get(disk.group)
        if disk.needs_full_sync or disk.last_ack_cycle == 0 or disk.sync_progress is not None:
            state = "full-sync"
        elif not self.connected:
            state = "disconnected"
        elif disk.group in self.fenced:
            state = self.fenced[disk.group]
        elif refused is not None:
            state = "refused"
        elif disk.is_dirty() or disk.cut is not None:
            state = "syncing"
        else:
            state = "in-sync"
        info: dict = {
            "state": state,
            "last_point": point,
            "bytes_sent": self.bytes_sent.get(disk.disk_id, 0),
            "bytes_dirty_shipped": self.bytes_shipped.get(disk.disk_id, 0),
            "disk_rpo_seconds": self.settings.for_disk(disk.disk_id, disk.path).rpo,
        }
        # lag_seconds (what the DR site would lose), rpo_seconds (the group's), rpo_violated,
        # rpo_breach_predicted, prediction, rate, ETA: vrfs/monitor.py
        info.update(self.group_info(disk.group) if group_info is None else group_info)
        info.update(self.monitor.disk_info(disk))
        if disk.sync_progress is not None:
            info["progress"] = round(disk.sync_progress, 4)
        if self.last_error and not self.connected:
            info["error"] = self.last_error
        elif refused is not None:
            info["error"] = f"the receiver refused the last cycle: {refused[2]}"
        return info

    # ----------------------------------------------------- peer identity

    def _load_peer(self) -> str:
        try:
            fd = os.open(PEER_FILE, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.vrfs_fd)
            with os.fdopen(fd) as f:
                return str(json.load(f).get("store_id", ""))
        except (OSError, ValueError, AttributeError):
            return ""

    def _history(self, disk: Disk) -> tuple[str, ...]:
        """The disk's generations: its identity, then one per failover (generations.json)."""
        return tuple(self.generations.get(disk.disk_id, (disk.disk_id.hex(),)))[-MAX_HISTORY:]

    def _load_generations(self) -> dict[bytes, list[str]]:
        try:
            fd = os.open(GENERATIONS_FILE, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.vrfs_fd)
            with os.fdopen(fd) as f:
                return {bytes.fromhex(k): [str(g) for g in v] for k, v in json.load(f).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring a damaged %s: %s", GENERATIONS_FILE, exc)
            return {}

    def _load_lineage(self) -> dict[bytes, int]:
        """From .vrfs/lineage.json, written by `vrfs failover` (vrfs/recovery.py)."""
        try:
            fd = os.open(LINEAGE_FILE, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.vrfs_fd)
            with os.fdopen(fd) as f:
                return {bytes.fromhex(k): int(v["point"]) for k, v in json.load(f).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("ignoring a damaged %s: %s", LINEAGE_FILE, exc)
            return {}

    def _save_peer(self) -> None:
        write_atomically(self.vrfs_fd, PEER_FILE, json.dumps({"store_id": self.store_id}).encode())


def _as_of_cut(cut: Cut, disk: Disk, size: int, first: int, count: int,
               data: bytes) -> list[tuple[int, Block]]:
    """A run of blocks as read, turned into what the cycle sends: each block
    is taken from the cut (a preserved copy, copy-on-write, replaces what was
    read), the run ends at the cut's size. Returns (first block, data) pieces:
    the whole run as one piece, without a copy, when no block of the disk
    waits in a preserved copy and the read was whole (the common case)."""
    bs = disk.block_size
    whole = min(count * bs, size - first * bs)
    if not cut.parts[disk].preserved and len(data) >= whole:
        for i in range(first, first + count):
            cut.take(disk, i, b"")  # marks the block read; with nothing preserved, nothing to replace
        return [(first, memoryview(data)[:whole])]
    pieces: list[tuple[int, Block]] = []
    for k in range(count):
        i = first + k
        block = cut.take(disk, i, data[k * bs:(k + 1) * bs])
        pieces.append((i, block[:max(0, min(bs, size - i * bs))]))
    return pieces


def _pread_ahead(fd: int, length: int, offset: int, following: tuple[int, int] | None) -> bytes:
    """Read a run of blocks, and have the kernel start reading the next run
    (offset, length) meanwhile, so that the next pread finds it cached."""
    data = os.pread(fd, length, offset)
    if following is not None:
        try:
            os.posix_fadvise(fd, following[0], following[1], os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
    return data
