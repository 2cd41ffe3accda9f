"""What every DR-site store does: metadata, journals, the apply procedure.

A store keeps, under its state directory: ``store-id`` (who it is: a source
that sees another id knows its target was replaced), ``lock`` (one `vrfs
serve` per store), ``meta/SOURCE/GROUP.json`` (the group's newest point and
its disks), ``journal/SOURCE/GROUP/`` (the cycle being staged or applied) and
``limbo/SOURCE/GROUP/`` (disks between their old and new names during a
rename). Backends (dirstore, devstore) only say where a disk's bytes live.

Methods here do blocking I/O: the receiver calls them in worker threads.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import xxhash

from vrfs.bitmap import Bitmap
from vrfs.cycle import CycleHeader, DiskEntry
from vrfs.retention import Policy
from vrfs.durable import atomic_write, remove_tree
from vrfs.store.journal import Journal
from vrfs.store.points import PointLost, PointStore, clone
from vrfs.testhooks import crash_point
from vrfs.wire import ProtocolError, block_length, check_name, disk_from_json, disk_to_json, is_zero

HASH_READ = 8 << 20
MAX_DIRECT_DISKS = 8  # disks of one cycle staged whole (an open file each while it stages)
CONTROL_FILE = "control"  # in the state directory: the control socket of the `vrfs serve` running on it


class StoreError(Exception):
    """The store cannot do what was asked; the message is for the operator and the peer."""


class DamagedMetadata(StoreError):
    """A group's metadata file cannot be read: that group is refused, named in
    the log and in `vrfs status --store`; the others are served."""


class StoreInUse(StoreError):
    """Another process (a `vrfs serve`) holds the store's lock."""


class Refusal(StoreError):
    """This store will not take one cycle of one group now; other groups go on.

    ``resync`` maps the disks whose replica cannot be built on (missing,
    damaged, or not the copy the source compared against) to the reason:
    the source compares them again (a full sync) before it resends."""

    def __init__(self, message: str, resync: dict[bytes, str] | None = None) -> None:
        super().__init__(message)
        self.resync = resync or {}


class Fenced(Refusal):
    """The group was failed over: its source may not write it any more."""


class Diverged(Fenced):
    """A disk's history does not contain the generation the store holds: two
    copies of it lived on apart (split brain). Nothing is written until a
    reprotect."""


class ApplyFailed(StoreError):
    """Applying a committed cycle failed on one disk (EFBIG, ENOSPC, EIO, ...)."""

    def __init__(self, disk: DiskEntry, exc: OSError) -> None:
        super().__init__(f"cannot apply to {disk.path}: {exc.strerror or exc}")
        self.disk_id = disk.disk_id


@dataclass(frozen=True)
class GroupState:
    """A group's newest point in the store."""

    cycle_id: int
    cut_time: float
    disks: tuple[DiskEntry, ...]
    # Set by a failover (vrfs/recovery.py): the group's images were handed to
    # the hypervisor; cycles from its source are refused until a reprotect.
    fenced: dict | None = None

    def to_json(self) -> dict:
        obj = {"cycle_id": self.cycle_id, "cut_time": self.cut_time, "disks": [disk_to_json(d) for d in self.disks]}
        if self.fenced is not None:
            obj["fenced"] = self.fenced
        return obj

    @classmethod
    def from_json(cls, obj: dict, group: str) -> GroupState:
        fenced = obj.get("fenced")
        return cls(int(obj["cycle_id"]), float(obj["cut_time"]), tuple(disk_from_json(d, group) for d in obj["disks"]),
                   fenced if isinstance(fenced, dict) else None)

    def by_id(self) -> dict[bytes, DiskEntry]:
        return {d.disk_id: d for d in self.disks}


@dataclass(frozen=True)
class Copy:
    """An open replica (or seed) of a disk, for hashing."""

    fd: int
    size: int
    sparse: bool  # SEEK_DATA/SEEK_HOLE tell holes apart
    # Which copy this is, as the source repeats it in the cycle that completes
    # a full sync: "disk:ID:FINGERPRINT" (the replica of a disk the store
    # knows, maybe another one that had this path) or "seed:FINGERPRINT" (a
    # file the store did not make). The fingerprint changes whenever the copy
    # does, so a cycle built on a copy that has since changed is refused.
    basis: str = ""


def parse_basis(basis: str) -> tuple[bytes | None, str]:
    """(disk_id or None for a seed, fingerprint) of a basis token; ValueError if malformed."""
    kind, _, rest = basis.partition(":")
    if kind == "seed" and rest:
        return None, rest
    if kind == "disk":
        hexid, _, fingerprint = rest.partition(":")
        disk_id = bytes.fromhex(hexid)
        if len(disk_id) == 16 and fingerprint:
            return disk_id, fingerprint
    raise ValueError(f"malformed basis {basis!r}")


class Store(ABC):
    def __init__(self, url: str, state_dir: Path):
        self.url = url
        self.state_dir = state_dir
        self.policy: Policy = ()  # older points to keep (vrfs serve --retain); () keeps the newest only
        self.points = PointStore(state_dir)
        self.store_id = ""
        self._lock_fd: int | None = None

    # --- lifecycle ----------------------------------------------------------

    def open(self) -> None:
        """Prepare the state directory and take the store's lock (for `vrfs serve`)."""
        try:
            self.state_dir.mkdir(exist_ok=True)
            for sub in ("meta", "journal", "limbo"):
                (self.state_dir / sub).mkdir(exist_ok=True)
            self._lock_fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot use {self.state_dir}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StoreInUse(f"store {self.url} is in use by another vrfs serve or vrfs command") from None
        id_file = self.state_dir / "store-id"
        if not id_file.exists():
            atomic_write(id_file, uuid.uuid4().hex.encode() + b"\n")
        self.store_id = id_file.read_text().strip()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- metadata -----------------------------------------------------------

    def _meta_path(self, source: str, group: str) -> Path:
        return self.state_dir / "meta" / source / f"{group}.json"

    def load_group(self, source: str, group: str) -> GroupState | None:
        """The group's newest point; None if the store has none. A damaged
        metadata file raises DamagedMetadata, which concerns that group alone."""
        path = self._meta_path(source, group)
        try:
            return GroupState.from_json(json.loads(path.read_bytes()), group)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError, ProtocolError) as exc:
            raise DamagedMetadata(f"the metadata of {source}/{group} ({path}) is damaged: {exc}") from None

    def save_group(self, source: str, group: str, state: GroupState) -> None:
        path = self._meta_path(source, group)
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, json.dumps(state.to_json()).encode())

    def groups(self) -> list[tuple[str, str, GroupState]]:
        out: list[tuple[str, str, GroupState]] = []
        meta = self.state_dir / "meta"
        if not meta.is_dir():
            return out
        for source_dir in sorted(meta.iterdir()):
            for f in sorted(source_dir.glob("*.json")):
                group = f.name[: -len(".json")]
                try:
                    state = self.load_group(source_dir.name, group)
                except DamagedMetadata:
                    continue  # that group alone: damaged_groups() names it
                if state is not None:
                    out.append((source_dir.name, group, state))
        return out

    def damaged_groups(self) -> list[tuple[str, str, str]]:
        """(source, group, reason) of every group whose metadata cannot be read."""
        out = []
        meta = self.state_dir / "meta"
        for f in sorted(meta.glob("*/*.json")) if meta.is_dir() else ():
            try:
                self.load_group(f.parent.name, f.name[: -len(".json")])
            except DamagedMetadata as exc:
                out.append((f.parent.name, f.name[: -len(".json")], str(exc)))
        return out

    # --- cycles: what the receiver does with a store ---------------------------
    #
    # begin_cycle gives the cycle being staged (a Journal: write blocks with
    # append and write_direct, then commit or discard); apply brings the
    # replicas to a committed cycle; staged_cycle finds a group's cycle again
    # (after a crash, a refused apply). A journal is the store's own: where it
    # lives and how apply reads it are this module's business.

    def journal_path(self, source: str, group: str) -> Path:
        return self.state_dir / "journal" / source / group

    def begin_cycle(self, source: str, header: CycleHeader, direct: dict[int, DiskEntry]) -> Journal:
        """A new, empty cycle of the group to stage (``direct``: the disks
        staged whole, from direct_disks). OSError (ENOSPC, EFBIG) when the
        store cannot hold even that; nothing is left behind then."""
        journal = Journal.create(self.journal_path(source, header.group))
        try:
            journal.start_direct(direct)
        except BaseException:
            journal.discard()
            raise
        return journal

    def staged_cycle(self, source: str, group: str) -> Journal:
        """The group's cycle as a previous connection or run left it (committed or not, or none)."""
        return Journal(self.journal_path(source, group))

    def journal_committed(self, source: str, group: str) -> bool:
        return self.staged_cycle(source, group).committed

    def leftover_journals(self) -> list[tuple[str, Journal]]:
        """Journals left by a crash or a dropped connection, as (source, journal)."""
        out = []
        for source_dir in sorted((self.state_dir / "journal").iterdir()):
            if not source_dir.is_dir():
                continue
            for group_dir in sorted(p for p in source_dir.iterdir() if p.is_dir()):
                try:
                    check_name(source_dir.name), check_name(group_dir.name)
                except ProtocolError:
                    continue  # not ours; never touch it
                out.append((source_dir.name, Journal(group_dir)))
        return out

    def settle(self, source: str, journal: Journal) -> GroupState | None:
        """Finish what a previous run left: apply a committed journal, drop staging."""
        if journal.committed:
            return self.apply(source, journal)
        journal.discard()
        return None

    # --- apply --------------------------------------------------------------

    # --- integrity of what a cycle builds on -----------------------------------

    def damaged(self, source: str, state: GroupState) -> dict[bytes, str]:
        """The disks of a group's point whose replica is missing or has the wrong size."""
        out = {}
        for disk in state.disks:
            reason = self.replica_damage(source, disk)
            if reason:
                out[disk.disk_id] = f"{disk.path}: replica {reason}"
        return out

    def open_copy(self, source: str, group: str, disk: DiskEntry) -> Copy | None:
        """The store's copy of ``disk`` for a comparison: its replica if the
        store knows its disk_id, else the replica of the disk that had its
        path, else a seed file at its path; None if there is none."""
        try:
            state = self.load_group(source, group)
        except DamagedMetadata:
            return None  # its cycles are refused anyway
        known = state.by_id().get(disk.disk_id) if state else None
        if known is None and state is not None:
            known = next((d for d in state.disks if d.path == disk.path), None)
        if known is None and not self.occupied(source, disk.path):
            self.place_seed(source, disk)
        copy = self.open_copy_at(source, disk, known)
        if copy is None:
            return None
        # The group's point is part of the basis: a cycle of the group applied
        # in between (a committed journal redone) changes the copy even where
        # the backend's fingerprint cannot tell (a device).
        return dataclasses.replace(copy, basis=f"{copy.basis}@{state.cycle_id if state else 0}")

    def basis_holds(self, source: str, disk: DiskEntry, basis: str, old: GroupState | None) -> bool:
        """Whether the copy a full sync compared against is still exactly there."""
        try:
            disk_id, fingerprint = parse_basis(basis)
        except ValueError:
            return False
        fingerprint, _, point = fingerprint.rpartition("@")
        if point != str(old.cycle_id if old else 0):
            return False
        if disk_id is None:
            return self.fingerprint(source, disk.path) == fingerprint
        base = old.by_id().get(disk_id) if old else None
        return base is not None and self.fingerprint(source, base.path) == fingerprint

    def check_cycle(self, source: str, header: CycleHeader, old: GroupState | None) -> None:
        """Refuse, before anything is staged, a cycle this store cannot hold or
        that builds on a replica that is not what the source believes it is."""
        old_by_id = old.by_id() if old else {}
        for disk in header.disks:
            held = old_by_id.get(disk.disk_id)
            if held is not None and held.history and disk.history and held.history[-1] not in disk.history:
                raise Diverged(f"{disk.path} has diverged: the DR site holds its generation {held.history[-1]}, "
                               f"the source's is {disk.history[-1]} and does not descend from it; nothing is "
                               "written until a reprotect")
        resync: dict[bytes, str] = {}
        claimed: set[str] = set()
        for disk in header.disks:
            if disk.disk_id in header.full_sync:
                basis = header.full_sync[disk.disk_id]
                if basis is not None and not self.basis_holds(source, disk, basis, old):
                    resync[disk.disk_id] = f"{disk.path}: the copy it was compared with has changed"
                elif basis is not None and _heir_of(disk, basis):
                    if basis in claimed:
                        # One copy can start one new disk (the disk it belongs to
                        # keeps it too); another one compares again, elsewhere.
                        resync[disk.disk_id] = f"{disk.path}: its copy is the start of another disk of the cycle"
                    claimed.add(basis)
            elif disk.disk_id in old_by_id:
                reason = self.replica_damage(source, old_by_id[disk.disk_id])
                if reason:
                    resync[disk.disk_id] = f"{disk.path}: replica {reason}"
            elif self.occupied(source, disk.path):
                resync[disk.disk_id] = f"{disk.path}: new here, and not compared with what holds its path"
        if resync:
            raise Refusal("; ".join(resync.values()) + ": a full sync is needed", resync)
        self.check_backend(source, header, old)

    # --- apply --------------------------------------------------------------

    def apply(self, source: str, journal: Journal) -> GroupState:
        """Bring the group's replica to the committed cycle of ``journal``.

        Idempotent, so a crash anywhere in it is repaired by running it again:
        1. move renamed and deleted disks out of the way into limbo (renames
           could swap names); a new disk whose full sync was compared with the
           replica of an old disk takes that replica as its start (moved if
           the old disk goes, copied if it stays); then write the
           ``limbo-filled`` marker so a redo never moves a file that already
           reached its new name;
        2. move disks from limbo to their new names (a redo finds them gone);
        3. set each disk's size (from empty if its full sync had no copy to
           compare with), write the journal's blocks, fsync;
        4. record the point, then remove the journal.
        Disks the journal was told to skip (receiver.py: a poisoned journal
        whose disk the source deleted or compares afresh) get no blocks.
        """
        header = journal.header()
        old = self.load_group(source, header.group)
        old_by_id = old.by_id() if old else {}
        skip = journal.skipped()
        limbo = self.state_dir / "limbo" / source / header.group
        retain_in = None
        if self.policy and old is not None:
            retain_in = self._capture(source, header, old, journal, skip)
        if not (journal.path / Journal.LIMBO_FILLED).exists():
            limbo.mkdir(parents=True, exist_ok=True)
            self.move_out(source, header, old_by_id, limbo, adoptions(header, old_by_id), retain_in)
            atomic_write(journal.path / Journal.LIMBO_FILLED, b"")
        if not (journal.path / Journal.MOVED_IN).exists():
            self.move_in(source, header, old_by_id, limbo)
            # A redo must not move or copy again: blocks written after this
            # point would be copied along (a device store copies on rename).
            atomic_write(journal.path / Journal.MOVED_IN, b"")
        direct = journal.direct()
        for disk in header.disks:
            if disk.disk_id in direct and disk.disk_id not in skip:
                # Staged whole: the replica-to-be takes the disk's name (a
                # redo finds it already gone from the journal, and in place).
                staged = journal.direct_path(disk.disk_id)
                try:
                    if os.path.lexists(staged):
                        self.place_direct(source, disk, staged)
                        crash_point("direct-placed")
                    elif self.replica_damage(source, disk):
                        raise FileNotFoundError(errno.ENOENT, f"its staged replica {staged} is gone")
                except OSError as exc:
                    raise ApplyFailed(disk, exc) from exc
        fds: list[int | None] = []
        try:
            for disk in header.disks:
                if disk.disk_id in skip or disk.disk_id in direct:
                    fds.append(None)
                    continue
                fresh = disk.disk_id in header.full_sync and header.full_sync[disk.disk_id] is None
                try:
                    fds.append(self.open_for_apply(source, disk, old_by_id.get(disk.disk_id), fresh))
                except OSError as exc:
                    raise ApplyFailed(disk, exc) from exc
            for disk_index, block_index, data in journal.records():
                fd = fds[disk_index]
                if fd is None:
                    continue
                disk = header.disks[disk_index]
                offset = block_index * disk.block_size
                try:
                    if data is None:
                        self.zero(fd, offset, block_length(disk, block_index))
                    else:
                        write_all(fd, data, offset)
                except OSError as exc:
                    raise ApplyFailed(disk, exc) from exc
            for disk, fd in zip(header.disks, fds, strict=True):
                if fd is not None:
                    try:
                        os.fsync(fd)
                    except OSError as exc:
                        raise ApplyFailed(disk, exc) from exc
        finally:
            for fd in fds:
                if fd is not None:
                    os.close(fd)
        self.sync_namespace(source, header, old)
        state = GroupState(header.cycle_id, header.cut_time, header.disks)
        self.save_group(source, header.group, state)
        journal.discard()
        remove_tree(limbo)
        self.prune(source, header.group, state)
        return state

    # --- seeds of the reverse direction (vrfs reprotect) ---------------------

    def seed_dir(self) -> Path:
        return self.state_dir / "seeds"

    def seed_info(self, disk_id: bytes) -> dict | None:
        """What `vrfs reprotect` knew of a disk it made a seed of: the point it
        was at (the last acknowledged one of its old source) and the blocks
        changed after it there (base64 bitmap, or None if unknown)."""
        try:
            return json.loads((self.seed_dir() / f"{disk_id.hex()}.json").read_bytes())
        except (OSError, ValueError):
            return None

    def place_seed(self, source: str, disk: DiskEntry) -> None:
        """A seed that reprotect left for this disk (by its identity) goes to
        the disk's path, where a full sync finds and compares it."""

    # --- older points (retention, vrfs/store/points.py) ---------------------

    def _capture(self, source: str, header: CycleHeader, old: GroupState, journal: Journal,
                 skip: set[bytes]) -> Path:
        """Before a cycle changes the replicas: the blocks it overwrites, as
        they are at the point ``old``, are saved under that point. Done once
        per journal (a redo must not save new content as old)."""
        point_dir = self.points.group_dir(source, header.group) / str(old.cycle_id)
        if (journal.path / Journal.CAPTURED).exists():
            return point_dir
        index_of = {d.disk_id: i for i, d in enumerate(header.disks)}
        changed: dict[bytes, Bitmap] = {d.disk_id: Bitmap() for d in old.disks}
        for disk_index, block_index, _ in journal.records(with_data=False):
            disk_id = header.disks[disk_index].disk_id
            if disk_id in changed and disk_id not in skip:
                changed[disk_id].set(block_index)
        saves = {}
        # A replica that is not there (deleted or cut short by hand at the DR
        # site) has no before-images to give: the point, and every older one,
        # can no longer rebuild that disk, and says so when asked for it.
        lost = [entry.disk_id.hex() for entry in old.disks if entry.disk_id not in skip
                and self.replica_damage(source, entry)]
        for entry in old.disks:
            if entry.disk_id not in index_of or entry.disk_id.hex() in lost:
                continue  # deleted: its whole replica goes to the point (move_out)
            new = header.disks[index_of[entry.disk_id]]
            blocks = changed[entry.disk_id]
            if entry.disk_id in header.full_sync and header.full_sync[entry.disk_id] is None:
                blocks.set_range(0, entry.block_count)  # rebuilt from empty: all of it changes
            elif new.size < entry.size:
                blocks.set_range(new.size // entry.block_size, entry.block_count)  # cut off by a shrink
            if blocks.count():
                saves[entry.disk_id] = (self.replica_path(source, entry.path), entry, blocks)
        point = {"cycle_id": old.cycle_id, "cut_time": old.cut_time, "disks": old.to_json()["disks"]}
        if lost:
            point["lost"] = lost
        self.points.capture(source, header.group, point, saves)
        atomic_write(journal.path / Journal.CAPTURED, b"")
        return point_dir

    def prune(self, source: str, group: str, state: GroupState) -> None:
        if self.points.ids(source, group):
            failover_point = (state.fenced or {}).get("point")  # a failover in progress needs it
            held = frozenset([failover_point]) if type(failover_point) is int else frozenset()
            self.points.prune(source, group, (state.cycle_id, state.cut_time), self.policy, time.time(), held)

    # --- points, as recovery reads them (vrfs/recovery.py) ------------------
    #
    # A point is a group's disks as they were at one cut. The newest is in
    # the replicas; older ones are the replicas with their undo data put back.

    def older_points(self, source: str, group: str) -> list[int]:
        """Ids of the group's retained points older than its newest, oldest first."""
        state = self.load_group(source, group)
        newest = state.cycle_id if state else 0
        return [i for i in self.points.ids(source, group) if i < newest]

    def point_state(self, source: str, group: str, point: int) -> GroupState:
        """The group as of one of its points (the newest: as it is)."""
        state = self.load_group(source, group)
        if state is not None and point == state.cycle_id:
            return state
        return GroupState.from_json(self.points.load(source, group, point), group)

    def point_cost(self, source: str, group: str, point: int) -> int:
        """Bytes an older point takes in the store: the blocks changed after it."""
        return self.points.size(source, group, point)

    def export_disk(self, source: str, group: str, point: GroupState, disk: DiskEntry, dest: Path) -> None:
        """``disk`` as it was at ``point`` into the new file ``dest``: a copy
        of its replica (sharing extents where the file system can), with the
        blocks changed since the point put back."""
        self.check_point(source, group, point, (disk,))
        newest = self.load_group(source, group)
        current = newest.by_id().get(disk.disk_id) if newest else None
        if current is not None:
            self.copy_replica(source, current, dest)
        else:  # deleted since: the point keeps it whole
            with open(dest, "wb"):
                pass
        if newest is None or point.cycle_id != newest.cycle_id:
            self.points.apply_undo(source, group, point.cycle_id, disk, dest)

    def check_point(self, source: str, group: str, point: GroupState, disks: tuple[DiskEntry, ...] = ()) -> None:
        """Raise PointLost if a disk of the point (or of ``disks``) cannot be
        rebuilt: recovery checks before it makes any image."""
        lost = self.points.lost(source, group, point.cycle_id)
        for disk in disks or point.disks:
            if disk.disk_id.hex() in lost:
                raise PointLost(f"{disk.path} cannot be rebuilt as of point {point.cycle_id}: its replica was "
                                f"missing or cut short at the DR site when the cycle after point "
                                f"{lost[disk.disk_id.hex()]} arrived")

    def forget_group(self, source: str, group: str) -> None:
        """Drop what the store knows of a group (a reprotect lifts a failed-over group's fence)."""
        self._meta_path(source, group).unlink(missing_ok=True)
        self.points.remove_group(source, group)
        remove_tree(self.journal_path(source, group))

    # --- where a disk's bytes are, for points ---------------------------------

    def replica_path(self, source: str, path: str) -> Path:
        """What holds the bytes of the replica of ``path`` (a file or a device)."""
        raise StoreError(f"{self.url}: this store cannot keep older points")

    def copy_replica(self, source: str, disk: DiskEntry, dest: Path) -> None:
        """The replica of ``disk`` into the new file ``dest``."""
        clone(self.replica_path(source, disk.path), dest)

    # --- disks staged whole (journal.py: direct/) -----------------------------

    stages_direct = False  # whether this backend can take a replica staged whole (place_direct)

    def direct_disks(self, source: str, header: CycleHeader) -> dict[int, DiskEntry]:
        """The disks of a cycle (by index) that can be staged whole, straight
        into a replica-to-be in the journal: those whose content before this
        cycle no committed point needs from their new replica, because the
        cycle builds them from zeros (a full sync that found no copy, a disk
        new to the store sent without comparison, which check_cycle let
        land only where nothing is). Their blocks are written once; apply
        renames the file into place. Called after check_cycle, with the group held."""
        if not self.stages_direct:
            return {}
        old = self.load_group(source, header.group)
        old_ids = {d.disk_id for d in old.disks} if old else set()
        out = {}
        for index, disk in enumerate(header.disks):
            if disk.disk_id in header.full_sync:
                if header.full_sync[disk.disk_id] is None:
                    out[index] = disk
            elif disk.disk_id not in old_ids:
                out[index] = disk
        # Each is an open file while the cycle stages: the largest few, so that
        # a group of thousands of small files does not run out of descriptors.
        largest = sorted(out, key=lambda i: -out[i].size)[:MAX_DIRECT_DISKS]
        return {i: out[i] for i in sorted(largest)}

    def place_direct(self, source: str, disk: DiskEntry, staged: Path) -> None:
        """Give a replica staged whole its disk's name (replacing what is there)."""
        raise StoreError(f"{self.url}: this store does not stage replicas whole")

    # --- what a backend provides ---------------------------------------------

    def check_backend(self, source: str, header: CycleHeader, old: GroupState | None) -> None:
        """Refuse, before anything is staged, a cycle this backend cannot hold."""

    @abstractmethod
    def replica_damage(self, source: str, disk: DiskEntry) -> str | None:
        """Why the replica of a disk the store knows cannot hold its point (missing,
        wrong size), or None."""

    @abstractmethod
    def occupied(self, source: str, path: str) -> bool:
        """Whether something already holds ``path``, so that a new disk there must be compared first."""

    @abstractmethod
    def fingerprint(self, source: str, path: str) -> str | None:
        """What changes whenever the copy at ``path`` changes; None if there is none."""

    @abstractmethod
    def open_copy_at(self, source: str, disk: DiskEntry, known: DiskEntry | None) -> Copy | None:
        """Open the replica of ``known`` (a disk the store knows), or else whatever holds the path of ``disk``."""

    @abstractmethod
    def move_out(self, source: str, header: CycleHeader, old: dict[bytes, DiskEntry], limbo: Path,
                 adopted: dict[bytes, DiskEntry], retain_in: Path | None) -> None:
        """Step 1 of apply. ``adopted`` maps an old disk_id to the new disk that starts from its
        replica; with ``retain_in`` (a point's directory) a deleted disk's replica is kept there."""

    @abstractmethod
    def move_in(self, source: str, header: CycleHeader, old: dict[bytes, DiskEntry], limbo: Path) -> None: ...

    @abstractmethod
    def open_for_apply(self, source: str, disk: DiskEntry, old: DiskEntry | None, fresh: bool) -> int:
        """An fd to write the disk's blocks to, already at the disk's new size
        (all zeros first if ``fresh``)."""

    @abstractmethod
    def zero(self, fd: int, offset: int, length: int) -> None: ...

    def sync_namespace(self, source: str, header: CycleHeader, old: GroupState | None) -> None:
        """Make renames and deletions durable before the point is recorded."""



def _heir_of(disk: DiskEntry, basis: str) -> bool:
    """Whether ``disk`` would start from another disk's replica (not its own, not a seed)."""
    try:
        base_id, _ = parse_basis(basis)
    except ValueError:
        return False
    return base_id is not None and base_id != disk.disk_id


def adoptions(header: CycleHeader, old: dict[bytes, DiskEntry]) -> dict[bytes, DiskEntry]:
    """Old disk_id -> the new disk of this cycle whose full sync was compared with its replica."""
    out = {}
    for disk in header.disks:
        basis = header.full_sync.get(disk.disk_id)
        if basis is None or disk.disk_id in old:
            continue
        try:
            base_id, _ = parse_basis(basis)
        except ValueError:
            continue
        if base_id is not None and base_id in old:
            out[base_id] = disk
    return out


def write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The data (non-hole) ranges of [start, end), found without reading."""
    out = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here on
                break
            return [(start, end)]  # no SEEK_DATA here: treat all as data
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        out.append((data, min(hole, end)))
        pos = hole
    return out


def hash_blocks(copy: Copy, block_size: int, first: int, count: int) -> list[bytes | None]:
    """xxh3-128 of blocks [first, first+count) of a copy; None for holes and all-zero blocks."""
    start = first * block_size
    end = min(copy.size, (first + count) * block_size)
    extents = data_extents(copy.fd, start, end) if copy.sparse else [(start, end)]
    out: list[bytes | None] = []
    ext = 0
    for index in range(first, first + count):
        offset = index * block_size
        length = min(block_size, copy.size - offset)
        while ext < len(extents) and extents[ext][1] <= offset:
            ext += 1
        if ext == len(extents) or extents[ext][0] >= offset + length:
            out.append(None)
            continue
        data = os.pread(copy.fd, length, offset)
        if len(data) < length:  # the copy is shorter than it claims: the rest reads as zeros
            data += bytes(length - len(data))
        out.append(None if is_zero(data) else xxhash.xxh3_128_digest(data))
    return out
