"""Change tracking: which blocks of which disks differ from the DR site.

See docs/tracker.md for the rules this module keeps; in short:

* every write, punch-hole and size change marks its blocks in the disk's
  in-memory bitmap *before* the backing file is touched;
* before a write may touch an extent that is not hot, the extent is recorded
  in the activity log and that record is durable (group commit, off the trio
  thread); only writes to cold extents wait;
* checkpoints replace each disk's state file whole; the activity log rotates
  first, so hot extents cool down only once a checkpoint covers them;
* recovery after a crash: checkpoint bitmap ∪ every block of a hot extent.

All methods run on the trio thread; blocking I/O goes to worker threads.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from vrfs import activitylog
from vrfs.bitmap import Bitmap
from vrfs.cycle import exchanged_path, group_of, moved_path
from vrfs.durable import write_atomically
from vrfs.statefile import CorruptStateFile, DiskState, read_state

log = logging.getLogger("vrfs.tracker")

DEFAULT_EXTENT_SIZE = 4 << 20
# Copies of blocks preserved for a cycle in flight stay in memory up to this
# much per cut; the rest goes to an unnamed file in the state directory.
COW_MEMORY_BOUND = 64 << 20
DIRTY_BOUND = 256 << 20  # a group whose dirty data passes this is cut early (the scheduler is told)
STATE_TRACKING = "tracking"
STATE_NEEDS_FULL_SYNC = "needs-full-sync"


def state_name(ino: int) -> str:
    return f"{ino}.psf"


@dataclass(eq=False)
class Disk:
    """One regular file of the datastore and what is known about its changes."""

    disk_id: bytes
    ino: int
    path: str
    size: int
    block_size: int
    extent_size: int
    active: Bitmap = field(default_factory=Bitmap)
    # Blocks of cycles that were cut but not yet acknowledged by the receiver:
    # they stay dirty (and in every checkpoint) until the ack.
    unacked: Bitmap = field(default_factory=Bitmap)
    hot: set[int] = field(default_factory=set)
    needs_full_sync: bool = False
    reason: str = ""
    last_ack_cycle: int = 0
    changed: bool = True  # since the last checkpoint
    cut: "Cut | None" = None  # the cycle in flight, whose unread blocks need copy-on-write
    full_sync_scanned: bool = False  # hashes compared; the next acknowledged cycle completes it
    # What that comparison was made against at the DR site (a token of the
    # receiver's, or None: it had no copy). The cycle that completes the full
    # sync carries it, so the receiver builds on exactly that copy.
    basis: str | None = None
    scanned_size: int = 0  # the size the full sync compared (growth past it was never compared)
    sync_progress: float | None = None
    # Blocks whose bit went from clear to set in ``active``, since the mount
    # started: the blocks a cycle must carry, each rewrite between two cuts
    # counted once (`vrfs plan --measure` samples it).
    newly_dirty: int = 0

    @property
    def group(self) -> str:
        return group_of(self.path)

    @property
    def state(self) -> str:
        return STATE_NEEDS_FULL_SYNC if self.needs_full_sync else STATE_TRACKING

    def dirty(self) -> Bitmap:
        return self.active | self.unacked

    def dirty_count(self) -> int:
        """dirty().count(), without building the union."""
        return self.active.union_count(self.unacked)

    def is_dirty(self) -> bool:
        return bool(self.active) or bool(self.unacked)

    def mark_full(self, reason: str) -> None:
        self.needs_full_sync = True
        self.reason = reason
        self.changed = True
        self.full_sync_scanned = False


class Group:
    """A unit of consistency. Counts the writes in progress so that a cut can
    wait for them to finish and hold new ones back meanwhile."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.writers = 0
        self.drained: trio.Event | None = None  # set when ``writers`` reaches 0, while a cut waits
        self.cut_in_progress: trio.Event | None = None
        self.oldest_change: float | None = None  # monotonic time of the oldest unshipped change
        # Bytes of the blocks marked since the last cut (each block once), for
        # the scheduler's timing and bound.
        self.dirty_bytes = 0
        self.bound_noted = False


class Tracker:
    def __init__(self, state_dir_fd: int, root_fd: int, block_size: int,
                 extent_size: int = DEFAULT_EXTENT_SIZE,
                 limiter: trio.CapacityLimiter | None = None,
                 checkpoint_interval: float = 30.0) -> None:
        self._dir_fd = state_dir_fd
        self._root_fd = root_fd
        self.block_size = block_size
        self.extent_size = extent_size
        self.checkpoint_interval = checkpoint_interval
        self._limiter = limiter or trio.CapacityLimiter(2)
        self.disks: dict[int, Disk] = {}  # by inode number of the backing file
        self.groups: dict[str, Group] = {}
        self._al: activitylog.ActivityLogFile | None = None
        self._al_lock = trio.Lock()
        self._checkpoint_lock = trio.Lock()
        self._queue: list[tuple[Disk, int, int]] = []
        self._pending: dict[tuple[bytes, int, int], trio.Event] = {}
        self._wakeup = trio.Event()
        self._forget_state_later: set[int] = set()
        # Set when a checkpoint should not wait for the interval: the first
        # acknowledgment of a disk or the end of its full sync, which a crash
        # would otherwise make the shipper repeat.
        self._checkpoint_soon = trio.Event()
        self.checkpoints = 0
        self.last_checkpoint = 0.0
        self.degraded = ""  # why tracking state is not durable now, if it is not
        # Told of each group's transition to changed (vrfs/scheduler.py); called
        # on the trio thread, so it must be cheap and must not await.
        self.change_listener: Callable[[str], None] | None = None
        self._layout = 0  # bumped whenever a disk comes, goes or changes its path
        self._index: dict[str, list[Disk]] = {}
        self._index_key: tuple[int, int] | None = None

    # ---------------------------------------------------------------- loading

    def load(self) -> None:
        """Build the disk table from the backing tree and the state files.

        Blocking; called once before the file system starts serving.
        """
        states: dict[int, DiskState | str] = {}
        for name in os.listdir(self._dir_fd):
            if not name.endswith(".psf") or not name[:-4].isdigit():
                continue
            try:
                states[int(name[:-4])] = read_state(self._dir_fd, name)
            except (CorruptStateFile, OSError) as exc:
                states[int(name[:-4])] = f"state file is corrupt ({exc})"
        min_gen = min((s.al_generation for s in states.values() if isinstance(s, DiskState)), default=0)
        hot = activitylog.read_hot_extents(self._dir_fd, min_gen)
        gens = activitylog.generations(self._dir_fd)
        self._next_al_gen = (gens[-1] + 1) if gens else max(
            (s.al_generation + 1 for s in states.values() if isinstance(s, DiskState)), default=1)

        names: dict[int, list[tuple[str, os.stat_result]]] = {}
        for path, st in self._walk():
            names.setdefault(st.st_ino, []).append((path, st))
        for ino, found in names.items():
            saved = states.pop(ino, None)
            # A disk with several names (hard links) replicates under one: the
            # one its state file knows, if it still has it.
            path, st = next(((p, s) for p, s in found if isinstance(saved, DiskState) and p == saved.path),
                            min(found, key=lambda item: item[0]))
            self.disks[ino] = self._recover(path, st, saved, hot)
        for ino in states:  # files deleted while vrfs was not mounted
            try:
                os.unlink(state_name(ino), dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass

    def _walk(self):
        for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=self._root_fd):
            if dirpath == ".":
                dirnames[:] = [d for d in dirnames if d != ".vrfs"]
            for name in filenames:
                try:
                    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    rel = name if dirpath == "." else f"{dirpath[2:]}/{name}"
                    yield rel, st

    def _recover(self, path: str, st: os.stat_result, saved: DiskState | str | None,
                 hot: dict[bytes, set[int]]) -> Disk:
        if not isinstance(saved, DiskState) or saved.block_size != self.block_size:
            disk = Disk(os.urandom(16), st.st_ino, path, st.st_size, self.block_size, self.extent_size)
            if saved is None:
                reason = "no state file (the file predates tracking)"
            elif isinstance(saved, str):
                reason = saved
            else:
                reason = f"state file has block size {saved.block_size}, datastore uses {self.block_size}"
            disk.mark_full(reason)
            log.warning("%s: needs full sync: %s", path, reason)
            return disk
        disk = Disk(saved.disk_id, st.st_ino, path, st.st_size, self.block_size, saved.extent_size,
                    active=Bitmap(saved.bitmap), needs_full_sync=saved.needs_full_sync,
                    reason=saved.reason, last_ack_cycle=saved.last_ack_cycle)
        if group_of(path) != group_of(saved.path):
            # Renamed into another group since its state was saved (or only
            # another name of it, a hard link, is left there): that group's
            # replica has no copy of it, so, as after a rename while mounted,
            # its content is compared.
            disk.last_ack_cycle = 0
            log.warning("%s: found under this name, in another group than %s (its name when its state "
                        "was saved): full sync", path, saved.path)
        if saved.clean:
            if saved.ctime_ns != st.st_ctime_ns or saved.size != st.st_size:
                disk.mark_full("changed in the backing tree while vrfs was not mounted")
                log.warning("%s: needs full sync: %s", path, disk.reason)
        else:
            extents = hot.get(saved.disk_id, set())
            per_extent = saved.extent_size // self.block_size
            for e in extents:
                disk.active.set_range(e * per_extent, (e + 1) * per_extent)
            log.warning("%s: recovered after an unclean shutdown: %d dirty blocks "
                        "(checkpoint %d, %d hot extents)", path, disk.active.count(),
                        Bitmap(saved.bitmap).count(), len(extents))
        return disk

    # ------------------------------------------------------------ write path

    def disk(self, ino: int) -> Disk | None:
        return self.disks.get(ino)

    def group(self, name: str) -> Group:
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = Group(name)
        return g

    async def begin_write(self, disk: Disk, offset: int, length: int) -> Group:
        """Mark the blocks of a change and make their extents hot. Returns the
        group, whose writer count stays raised until ``end_write``: the backing
        write must happen in between.

        The common case (no cut in progress, extents already hot) awaits
        nothing and allocates nothing: it runs once per write request."""
        group = self.group(disk.group)
        if length > 0:
            bs = disk.block_size
            first, stop = offset // bs, (offset + length + bs - 1) // bs
            per_extent = disk.extent_size // bs
            hot = disk.hot
            if (group.cut_in_progress is not None or first // per_extent not in hot
                    or (stop - 1) // per_extent not in hot):
                await self._wait_for_cut(group)
                await self._make_hot(disk, first, stop)
                while group.cut_in_progress is not None:  # a cut began while we waited
                    await self._wait_for_cut(group)
                    await self._make_hot(disk, first, stop)
            elif stop - first > per_extent:
                await self._make_hot(disk, first, stop)  # extents in between; returns at once if hot
            # No await between the last check above and here: the marks and the
            # writer count change atomically with respect to cuts and checkpoints.
            if disk.cut is not None:
                disk.cut.preserve(disk, first, stop)
            if stop - first == 1:
                newly = 0 if disk.active.test(first) else 1
                if newly:
                    disk.active.set(first)
            else:
                newly = disk.active.set_range(first, stop)
            disk.newly_dirty += newly
            disk.changed = True
            group.dirty_bytes += newly * bs
            if group.dirty_bytes >= DIRTY_BOUND and not group.bound_noted:
                group.bound_noted = True
                self._changed(group.name)
        elif group.cut_in_progress is not None:
            await self._wait_for_cut(group)
        if group.oldest_change is None:
            group.oldest_change = time.monotonic()
            self._changed(group.name)
        group.writers += 1
        return group

    @staticmethod
    async def _wait_for_cut(group: Group) -> None:
        while group.cut_in_progress is not None:
            await group.cut_in_progress.wait()

    @staticmethod
    def end_write(group: Group) -> None:
        group.writers -= 1
        if group.writers == 0 and group.drained is not None:
            group.drained.set()

    def wrote(self, disk: Disk, offset: int, length: int) -> None:
        """Bookkeeping after a successful write: the file may have grown."""
        if offset + length > disk.size:
            disk.size = offset + length

    async def _make_hot(self, disk: Disk, first: int, stop: int) -> None:
        per_extent = disk.extent_size // disk.block_size
        while True:
            assert self._al is not None  # opened by start(), before any write
            gen = self._al.generation
            cold = [e for e in range(first // per_extent, (stop - 1) // per_extent + 1) if e not in disk.hot]
            if not cold:
                return
            events = []
            for e in cold:
                key = (disk.disk_id, e, gen)
                ev = self._pending.get(key)
                if ev is None:
                    ev = self._pending[key] = trio.Event()
                    self._queue.append((disk, e, gen))
                events.append(ev)
            self._wakeup.set()
            for ev in events:
                await ev.wait()

    async def run_activity_log(self) -> None:
        """Group commit: every batch of newly hot extents costs one fdatasync."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            async with self._al_lock:
                batch, self._queue = self._queue, []
                if not batch:
                    continue
                assert self._al is not None  # opened by start(), before any write
                al = self._al
                records = b"".join(activitylog.encode_record(d.disk_id, e) for d, e, gen in batch
                                   if gen == al.generation)
                try:
                    if records:
                        await trio.to_thread.run_sync(al.append_durably, records, limiter=self._limiter)
                        self._durable_again()
                except OSError as exc:
                    # The VM's writes must go on: these disks lose what a crash
                    # would need, so a crash must cost a full sync instead.
                    await trio.to_thread.run_sync(self._untrack, {d for d, _, _ in batch}, exc,
                                                  limiter=self._limiter)
                finally:
                    for disk, extent, gen in batch:
                        if gen == self._al.generation:
                            disk.hot.add(extent)
                        self._pending.pop((disk.disk_id, extent, gen)).set()

    def _untrack(self, disks: set[Disk], exc: OSError) -> None:
        """Tracking of ``disks`` cannot be made durable (the state directory is
        full or failing). Their state files go, which needs no space: after a
        crash they have none, and a full sync compares them, which is always
        safe. Until then they replicate as usual, marked needs-full-sync."""
        reason = f"tracking state cannot be made durable ({exc.strerror or exc}); a full sync follows"
        if self.degraded != reason:
            log.error("%s: %s", ", ".join(sorted(d.path for d in disks)), reason)
        self.degraded = reason
        for disk in disks:
            if not disk.needs_full_sync:
                disk.mark_full(reason)
            try:
                os.unlink(state_name(disk.ino), dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
            except OSError as unlink_exc:
                log.error("%s: cannot remove its state file either: %s", disk.path, unlink_exc)

    def _durable_again(self) -> None:
        if self.degraded:
            log.warning("tracking state is durable again (before: %s)", self.degraded)
            self.degraded = ""
            self._checkpoint_soon.set()

    # ------------------------------------------------------------- namespace

    def created(self, ino: int, path: str, size: int = 0) -> Disk:
        """A regular file came into being through the mount: it starts in sync
        with an empty dirty set (its creation travels with its group's cycle)."""
        disk = self.disks.get(ino)
        if disk is None:
            disk = self.disks[ino] = Disk(os.urandom(16), ino, path, size, self.block_size, self.extent_size)
            self._layout += 1
            self.note_change(disk.group)
        return disk

    def note_change(self, group_name: str) -> None:
        g = self.group(group_name)
        if g.oldest_change is None:
            g.oldest_change = time.monotonic()
        self._changed(group_name)

    def _changed(self, group_name: str) -> None:
        """Tell the scheduler, once per transition (never per write). Called
        from the write path: a fault in the listener must not fail the VM's
        write, so it is logged and the shipper finds the group at its next pass."""
        if self.change_listener is not None:
            try:
                self.change_listener(group_name)
            except Exception:
                log.exception("%s: the scheduler could not take a change", group_name)

    def removed(self, ino: int) -> None:
        """The last name of a disk is gone."""
        disk = self.disks.pop(ino, None)
        if disk is not None:
            self._layout += 1
            self._forget_state_later.add(ino)
            self.note_change(disk.group)

    def name_removed(self, ino: int, path: str, other: str | None) -> None:
        """One name of a disk with several (hard links) is gone: it replicates
        under another one, or, if no other name is known, stops replicating."""
        if not self.tracks(ino, path):
            return
        if other is not None:
            self.renamed(path, other)
        else:
            log.warning("%s: removed, and its other names are unknown; it is no longer replicated", path)
            self.removed(ino)

    def tracks(self, ino: int, path: str) -> bool:
        """Whether ``path`` is the name the disk of ``ino`` replicates under."""
        disk = self.disks.get(ino)
        return disk is not None and disk.path == path

    def find_name(self, ino: int, exclude: str) -> str | None:
        """Another name of ``ino`` in the backing tree (blocking: a walk; for a
        hard-linked disk whose other names the kernel never looked up)."""
        return next((p for p, st in self._walk() if st.st_ino == ino and p != exclude), None)

    def renamed(self, old: str, new: str) -> None:
        """A file or directory moved; disks below it follow."""
        self._move(lambda p: moved_path(p, old, new))

    def exchanged(self, a: str, b: str) -> None:
        """Two files or directories swapped names (RENAME_EXCHANGE), at once."""
        self._move(lambda p: exchanged_path(p, a, b))

    def _move(self, where: Callable[[str], str | None]) -> None:
        moves = [(disk, where(disk.path)) for disk in self.disks.values()]
        moves = [(disk, new) for disk, new in moves if new is not None]
        moved = {disk for disk, _ in moves}
        taken = {new for _, new in moves}
        for ino, disk in list(self.disks.items()):
            if disk not in moved and disk.path in taken:
                # Replaced by the move (a caller that knew of another name of
                # it has already moved it there): its replica goes.
                log.info("%s: replaced by a rename", disk.path)
                self.removed(ino)
        for disk, new in moves:
            assert new is not None  # moves keeps only the disks that moved
            old_group = disk.group
            self.note_change(old_group)
            disk.path = new
            self._layout += 1
            disk.changed = True
            self.note_change(disk.group)
            if disk.group != old_group:
                # The DR site knows the disk only in its old group: to the
                # new group it is a new disk, whose content must be compared.
                disk.last_ack_cycle = 0
                disk.full_sync_scanned = False

    @staticmethod
    def resize_range(old: int, new: int) -> tuple[int, int]:
        """The byte range a size change alters: a shrink drops [new, old); a
        growth adds zeros, which the replica gets from its own size change
        (a shrink and regrowth within one cycle is covered by the shrink)."""
        return (new, old - new) if new < old else (new, 0)

    # ------------------------------------------------------------------ cuts

    @property
    def layout_version(self) -> tuple[int, int]:
        """Changes whenever a disk comes, goes or changes its path."""
        return self._layout, len(self.disks)

    def group_disks(self, name: str) -> list[Disk]:
        """The disks of one group, from an index rebuilt only when the namespace
        changed: status, metrics and the scheduler ask per group, and a walk of
        every disk per question stalled the loop on large datastores."""
        return list(self._group_index().get(name, ()))

    def group_names(self) -> list[str]:
        """The groups that have disks, sorted (from the same index)."""
        return sorted(self._group_index())

    def _group_index(self) -> dict[str, list[Disk]]:
        key = self.layout_version
        if self._index_key != key:
            index: dict[str, list[Disk]] = {}
            for disk in self.disks.values():
                index.setdefault(disk.group, []).append(disk)
            self._index, self._index_key = index, key
        return self._index

    async def cut(self, name: str, open_disk) -> "Cut":
        """Atomically end a cycle of group ``name``: wait for its writes in
        progress, hold new ones back, and move every disk's active bitmap
        into the cycle. ``open_disk(disk)`` opens a read descriptor (called
        with writes held back, so the descriptor sees the cut's content)."""
        group = self.group(name)
        while group.cut_in_progress is not None:
            await group.cut_in_progress.wait()
        gate = group.cut_in_progress = trio.Event()
        try:
            if group.writers:
                group.drained = trio.Event()
                await group.drained.wait()
                group.drained = None
            disks = sorted(self.group_disks(name), key=lambda d: d.path)
            cut = Cut(name, time.time(), group.oldest_change, self._dir_fd)
            cut.dirty_bytes = group.dirty_bytes
            fds: list[int] = []
            try:  # open everything before anything moves, so a failure changes nothing
                for disk in disks:
                    fds.append(open_disk(disk))
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            for disk, fd in zip(disks, fds, strict=True):
                bits = disk.active | disk.unacked
                disk.unacked = bits.copy()
                disk.active = Bitmap()
                disk.cut = cut
                cut.add(disk, fd, bits)
            group.oldest_change = None
            group.dirty_bytes, group.bound_noted = 0, False
        finally:
            group.cut_in_progress = None
            gate.set()
        return cut

    def acknowledged(self, cut: "Cut", cycle_id: int) -> None:
        """The receiver committed the cycle: its blocks are clean now."""
        for disk, part in cut.parts.items():
            if disk.last_ack_cycle == 0 or part.full_sync:
                self._checkpoint_soon.set()
            # Bits set again after the cut are in disk.active, not here.
            disk.unacked = Bitmap()
            disk.changed = True
            if disk.group != cut.group:
                # Moved into another group while the cycle was on the wire:
                # the point is its old group's, and the new group has no copy
                # of it yet (its full sync, set up by the move, still comes).
                continue
            disk.last_ack_cycle = cycle_id
            if part.full_sync:
                disk.needs_full_sync = False
                disk.reason = ""
        self.release(cut)

    def failed(self, cut: "Cut") -> None:
        """The cycle did not arrive: its blocks stay in ``unacked`` and go with
        the next cut; the group's oldest change is the cut's."""
        group = self.group(cut.group)
        if cut.oldest_change is not None:
            group.oldest_change = min(cut.oldest_change, group.oldest_change or cut.oldest_change)
        group.dirty_bytes += cut.dirty_bytes
        self.release(cut)
        self._changed(cut.group)

    @staticmethod
    def release(cut: "Cut") -> None:
        for disk in cut.parts:
            if disk.cut is cut:
                disk.cut = None
        cut.close()

    # ------------------------------------------------------------ checkpoint

    async def start(self) -> None:
        """Open a new activity-log generation and write a checkpoint that marks
        every disk as not cleanly shut down."""
        self._al = await trio.to_thread.run_sync(
            activitylog.ActivityLogFile, self._dir_fd, self._next_al_gen)
        await self.checkpoint(all_disks=True)
        for disk in self.disks.values():  # what was dirty before this mount is due now
            if disk.is_dirty() or disk.needs_full_sync:
                self.note_change(disk.group)

    async def checkpoint(self, *, clean: bool = False, all_disks: bool = False) -> None:
        assert self._al is not None  # opened by start(), which writes the first checkpoint
        async with self._checkpoint_lock:
            async with self._al_lock:
                old = self._al
                self._al = await trio.to_thread.run_sync(
                    activitylog.ActivityLogFile, self._dir_fd, old.generation + 1)
                for disk in self.disks.values():
                    disk.hot.clear()  # from here on, every write logs in the new generation
            gen = self._al.generation
            snapshot = []
            for disk in self.disks.values():
                if disk.changed or clean or all_disks:
                    disk.changed = False
                    snapshot.append(DiskState(
                        disk_id=disk.disk_id, path=disk.path, block_size=disk.block_size,
                        extent_size=disk.extent_size, ino=disk.ino, size=disk.size,
                        generation=self.checkpoints + 1, last_ack_cycle=disk.last_ack_cycle,
                        al_generation=gen, clean=clean, needs_full_sync=disk.needs_full_sync,
                        reason=disk.reason, bitmap=disk.dirty().to_bytes()))
            forget, self._forget_state_later = self._forget_state_later, set()
            await trio.to_thread.run_sync(self._write_checkpoint, snapshot, forget, old, clean,
                                          limiter=self._limiter)
            self.checkpoints += 1
            self.last_checkpoint = time.time()

    def _write_checkpoint(self, snapshot: list[DiskState], forget: set[int],
                          old_al: activitylog.ActivityLogFile, clean: bool) -> None:
        for state in snapshot:
            if clean:  # to notice changes made while vrfs is not mounted
                try:
                    st = os.stat(state.path, dir_fd=self._root_fd, follow_symlinks=False)
                    state.ctime_ns, state.size = st.st_ctime_ns, st.st_size
                except FileNotFoundError:
                    continue
            write_atomically(self._dir_fd, state_name(state.ino), state.encode(), sync_dir=False)
        for ino in forget:
            if ino not in self.disks:
                try:
                    os.unlink(state_name(ino), dir_fd=self._dir_fd)
                except FileNotFoundError:
                    pass
        os.fsync(self._dir_fd)
        old_al.close()
        activitylog.remove_older_than(self._dir_fd, old_al.generation + 1)

    async def run_checkpoints(self) -> None:
        """A checkpoint that fails (ENOSPC, EIO) keeps the older activity-log
        generations, which still cover every write since the last good one;
        it is tried again, sooner, and the datastore goes on serving."""
        interval = self.checkpoint_interval
        while True:
            with trio.move_on_after(interval):
                await self._checkpoint_soon.wait()
            self._checkpoint_soon = trio.Event()
            try:
                await self.checkpoint()
            except OSError as exc:
                reason = f"checkpoint failed ({exc.strerror or exc})"
                if self.degraded != reason:
                    log.error("%s; older activity-log generations are kept, retrying", reason)
                self.degraded = reason
                for disk in self.disks.values():
                    disk.changed = True
                interval = min(self.checkpoint_interval, 5.0)
            else:
                interval = self.checkpoint_interval
                if self.degraded.startswith("checkpoint failed"):
                    log.warning("checkpoints work again")
                    self.degraded = ""

    async def shutdown(self) -> None:
        """Clean shutdown, after the file system stopped serving requests. If
        the last checkpoint cannot be written, the next mount recovers as
        after a crash (activity log), which is safe."""
        try:
            await self.checkpoint(clean=True)
        except OSError as exc:
            log.error("final checkpoint failed (%s): the next mount recovers from the activity log", exc)
        assert self._al is not None
        self._al.close()

    # ---------------------------------------------------------------- status

    def describe(self, disk: Disk, with_ranges: bool = False) -> dict:
        count = disk.dirty_count()
        info = {
            "path": disk.path,
            "group": disk.group,
            "disk_id": disk.disk_id.hex(),
            "size": disk.size,
            "block_size": disk.block_size,
            "dirty_blocks": count,
            "dirty_bytes": min(count * disk.block_size, max(disk.size, 0)) if count else 0,
            "blocks_newly_dirty": disk.newly_dirty,
            "state": disk.state,
        }
        if disk.needs_full_sync:
            info["reason"] = disk.reason
        if self.degraded:  # whatever the disk's state: what a crash now would cost
            info["warning"] = self.degraded
        if with_ranges:
            info["dirty_ranges"] = ranges(disk.dirty())
        return info


def ranges(bitmap: Bitmap) -> list[list[int]]:
    """Set bits as [first, stop) pairs."""
    out: list[list[int]] = []
    for i in bitmap:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


@dataclass(eq=False)
class CutPart:
    fd: int
    size: int
    bits: Bitmap
    unread: Bitmap  # a bitmap, not a set: a full sync can put millions of blocks in one cycle
    unread_count: int
    # In memory, or (offset, length) spilled to a file.
    preserved: dict[int, bytes | tuple[int, int]] = field(default_factory=dict)
    full_sync: bool = False  # this cycle completes the disk's full sync, compared against ``basis``
    basis: str | None = None


class Cut:
    """A group's cycle between its cut and its acknowledgment.

    Copy-on-write: until the shipper has read a block of the cycle, the first
    write to it preserves the block's content as of the cut (``preserve``,
    called by ``begin_write`` before the backing file changes). The shipper
    reads a block, then asks ``take``: a preserved copy wins over what it read,
    since the read may have raced with a later write.
    """

    def __init__(self, group: str, cut_time: float, oldest_change: float | None,
                 spill_dir_fd: int) -> None:
        self.group = group
        self.cut_time = cut_time
        self.oldest_change = oldest_change
        self.dirty_bytes = 0  # the group's estimate at the cut, given back if the cycle fails
        self.parts: dict[Disk, CutPart] = {}
        self.preserved_bytes = 0  # held in memory
        self._spill_dir_fd = spill_dir_fd
        self._spill_fd: int | None = None  # an unnamed file in the state directory
        self._spill_end = 0

    def add(self, disk: Disk, fd: int, bits: Bitmap) -> None:
        size = os.fstat(fd).st_size
        if disk.full_sync_scanned and size > disk.scanned_size:
            # Grown since its full sync compared it: the grown part was never
            # compared, and a replica that is not sparse (a device) holds
            # whatever it held there. Its blocks go with the cycle (zero
            # records where the file reads as zeros).
            bits = bits.copy()
            bits.set_range(disk.scanned_size // disk.block_size, -(-size // disk.block_size))
        part = CutPart(fd, size, bits, bits.copy(), bits.count())
        part.full_sync = disk.full_sync_scanned
        part.basis = disk.basis
        self.parts[disk] = part

    def preserve(self, disk: Disk, first: int, stop: int) -> None:
        part = self.parts.get(disk)
        if part is None or not part.unread_count:
            return
        for i in range(first, stop):
            if part.unread.test(i):
                part.unread.clear(i)
                part.unread_count -= 1
                data = os.pread(part.fd, disk.block_size, i * disk.block_size)
                if self.preserved_bytes + len(data) <= COW_MEMORY_BOUND:
                    part.preserved[i] = data
                    self.preserved_bytes += len(data)
                else:
                    part.preserved[i] = self._spill(data)

    def _spill(self, data: bytes) -> tuple[int, int]:
        if self._spill_fd is None:
            self._spill_fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600,
                                     dir_fd=self._spill_dir_fd)
        offset = self._spill_end
        os.pwrite(self._spill_fd, data, offset)
        self._spill_end += len(data)
        return offset, len(data)

    def take(self, disk: Disk, index: int, read: bytes) -> bytes:
        part = self.parts[disk]
        if part.unread.test(index):
            part.unread.clear(index)
            part.unread_count -= 1
        kept = part.preserved.pop(index, None)
        if kept is None:
            return read
        if isinstance(kept, tuple):
            assert self._spill_fd is not None  # a tuple is where preserve() spilled it
            return os.pread(self._spill_fd, kept[1], kept[0])
        self.preserved_bytes -= len(kept)
        return kept

    def close(self) -> None:
        for part in self.parts.values():
            os.close(part.fd)
        self.parts.clear()
        if self._spill_fd is not None:
            os.close(self._spill_fd)
            self._spill_fd = None
