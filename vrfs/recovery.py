"""Getting VMs back at the DR site: points, test failover, failover.

Every function here works on an open store while the group is held, so that
no cycle of it is applied meanwhile: by `vrfs serve` (through its control
socket, vrfs/serve.py) when it runs, else by the command itself, which then
holds the store's lock (vrfs/drcmd.py). They do blocking I/O and return the
lines to print, one for each thing done.

- test failover: writable images of a group's point under DIR/GROUP/…, while
  replication goes on: raw sparse copies, or qcow2 overlays on a read-only
  sparse copy of the point (qemu-img);
- failover: fences the group (its source is refused from now on) and hands
  its replicas to DIR as a datastore that `vrfs mount DIR` serves, with each
  disk's lineage: its identity and state files say it is exactly at the
  point, so tracking there starts from it.

A store keeps the newest point of each group in its replicas, and older
points as undo data when `vrfs serve --retain` asks for them
(vrfs/store/points.py).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import subprocess
import time
import uuid
from pathlib import Path

from vrfs.cycle import MAX_HISTORY, DiskEntry
from vrfs.durable import atomic_write, fsync_dir
from vrfs.errors import UserError
from vrfs.layout import CONFIG_NAME, GENERATIONS_FILE, LINEAGE_FILE, LOCK_NAME, STATE_DIR, TRACKING_DIR
from vrfs.mountinfo import mount_field
from vrfs.retention import Policy
from vrfs.statefile import DiskState
from vrfs.store.base import GroupState, Store
from vrfs.store.dirstore import DirStore
from vrfs.store.points import copy_extents
from vrfs.testhooks import crash_point
from vrfs.tracker import DEFAULT_EXTENT_SIZE, Disk, Tracker
from vrfs.wire import encode_bitmap

TEST_MARK = ".vrfs-test-failover.json"  # in a test failover's DIR: what made it, for --cleanup
SMALL_FILE = 1 << 20  # smaller files (VM configuration, NVRAM) are copied as they are, never wrapped in qcow2
# The retention of a command that applies a committed cycle without `vrfs serve`:
# every point is kept (one per microsecond of cut time, for ever).
KEEP_EVERY_POINT: Policy = ((float("inf"), 1e-6),)


def list_points(store: Store, source: str | None = None, group: str | None = None) -> list[dict]:
    """Every point of every group (or one), oldest first: id, cut time, disks,
    and the bytes it costs (the blocks that changed after it; 0 for the newest)."""
    out = []
    for src, grp, state in store.groups():
        if (source and src != source) or (group and grp != group):
            continue
        for point in store.older_points(src, grp):
            older = store.point_state(src, grp, point)
            out.append(_point_entry(src, grp, point, older.cut_time, [(d.path, d.size) for d in older.disks],
                                    store.point_cost(src, grp, point), None))
        out.append(_point_entry(src, grp, state.cycle_id, state.cut_time,
                                [(d.path, d.size) for d in state.disks], 0, state.fenced))
    return out


def _point_entry(source: str, group: str, point: int, cut_time: float, disks: list[tuple[str, int]],
                 cost: int, fenced: dict | None) -> dict:
    return {"source": source, "group": group, "id": point, "cut_time": cut_time,
            "disks": [{"path": p, "size": n} for p, n in disks], "bytes": sum(n for _, n in disks),
            "bytes_kept": cost, "fenced": fenced}


def _group(store: Store, source: str, group: str, point: int | None) -> GroupState:
    state = store.load_group(source, group)
    if state is None:
        known = sorted(f"{s}/{g}" for s, g, _ in store.groups())
        raise UserError(f"{source}/{group}: no such group in {store.url}"
                        + (f" (it has {', '.join(known)})" if known else " (it holds no group)"))
    if point is not None and point != state.cycle_id and point not in store.older_points(source, group):
        kept = store.older_points(source, group) + [state.cycle_id]
        raise UserError(f"{source}/{group}: no point {point} (the store keeps {', '.join(map(str, kept))})")
    return state


def _point_state(store: Store, source: str, group: str, point: int | None) -> GroupState:
    """The group as of a point (None: the newest)."""
    if point is None:
        state = store.load_group(source, group)
        assert state is not None
        return state
    return store.point_state(source, group, point)


def _settled(store: Store, source: str, group: str) -> GroupState:
    """The group at its last committed point: a committed journal is applied
    first (a failover while a cycle is in flight gives that cycle, never a mix)."""
    journal = store.staged_cycle(source, group)
    if journal.committed:
        try:
            store.apply(source, journal)
        except Exception as exc:
            raise UserError(f"{source}/{group}: its last committed cycle cannot be applied ({exc}); "
                            "the replica is between two points") from None
    state = store.load_group(source, group)
    assert state is not None
    return state


def _checked_target(store: Store, to: Path) -> list[str]:
    """What every --to must be: outside the store (whose own files would
    replace, discard or prune it), outside a served datastore, not a
    symbolic link, a directory where it is, and not a test failover. Returns
    its entries ([] if it does not exist yet)."""
    _outside_store(store, to, "--to")
    _not_in_a_vrfs_mount(to, "--to")
    if to.is_symlink():
        raise UserError(f"{to} is a symbolic link; give the directory itself")
    if not to.exists():
        return []
    if not to.is_dir():
        raise UserError(f"{to} exists and is not an empty directory")
    entries = [p.name for p in to.iterdir()]
    if TEST_MARK in entries:
        raise UserError(f"{to} holds a test failover; `vrfs test-failover --cleanup {to}` removes it")
    return entries


def _empty_target(store: Store, to: Path) -> None:
    if _checked_target(store, to):
        raise UserError(f"{to} exists and is not an empty directory")


def _failover_target(store: Store, to: Path, group: str, block_sizes: set[int]) -> None:
    """Where a failover may put a group: an empty directory, or a datastore
    (not served) that does not hold the group yet and tracks in the group's
    block size, so that a whole site fails over into one datastore, group by
    group (or the old one, emptied by a reprotect)."""
    entries = _checked_target(store, to)
    config = to / STATE_DIR / CONFIG_NAME
    if not entries or (entries == [STATE_DIR] and not config.is_file()):
        return
    if not config.is_file():
        raise UserError(f"{to} exists and is not an empty directory (nor a vrfs datastore)")
    if os.path.lexists(to / group):
        raise UserError(f"{to} already holds {group}; fail {group} over elsewhere, or move it away first")
    try:
        block_size = int(json.loads(config.read_bytes())["block_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{to}: cannot read its settings ({exc})") from None
    if block_sizes - {block_size}:
        raise UserError(f"{to} tracks {block_size}-byte blocks, {group}'s disks have "
                        f"{', '.join(map(str, sorted(block_sizes)))}; fail it over into another directory")


def _outside_store(store: Store, path: Path, what: str) -> None:
    """``path`` (which may not exist yet) must be neither inside the store's
    directories nor hold them."""
    real = Path(os.path.realpath(path))
    for own in {store.state_dir, getattr(store, "root", store.state_dir)}:
        own = Path(os.path.realpath(own))
        if real == own or own in real.parents or real in own.parents:
            raise UserError(f"{what} {path} is {'inside' if own in real.parents or real == own else 'above'} "
                            f"the store's own directory {own}; give a directory outside it")


def _vrfs_mount_over(path: Path) -> str | None:
    """The mount point of the `vrfs mount` that ``path`` (existing or not) is
    in, or None: a file written there goes through the mount (tracked,
    replicated, and its .vrfs hidden), not into the directory beneath."""
    real = os.path.realpath(path)
    best, best_type = "", ""
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 3:
                continue
            mountpoint = mount_field(fields[1])
            if (real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/")) and len(mountpoint) >= len(best):
                best, best_type = mountpoint, fields[2]
    return best if best_type == "fuse.vrfs" else None


def _not_in_a_vrfs_mount(path: Path, what: str) -> None:
    mountpoint = _vrfs_mount_over(path)
    if mountpoint is not None:
        raise UserError(f"{what} {path} is in a datastore that vrfs mount serves ({mountpoint}): stop it first "
                        "(`vrfs umount`)")


def _make_target(to: Path) -> None:
    """Create ``to`` and check that only we can write it, before a failover
    fences the group (what fails here must not leave it fenced). Images are
    written there as the store's user; a directory that another user can
    write would let that user swap a file or directory for a symbolic link
    to, say, /etc/shadow between our check and our write."""
    try:
        to.parent.mkdir(parents=True, exist_ok=True)
        to.mkdir(mode=0o755, exist_ok=True)
        st = os.lstat(to)
    except OSError as exc:
        raise UserError(f"cannot create {to}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{to} is not a directory")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise UserError(f"{to} can be written by others (owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}), "
                        "who could put symbolic links where the images go; use a directory that only "
                        f"user {os.geteuid()} can write (chmod go-w), or a new one")
    if not os.access(to, os.W_OK | os.X_OK):
        raise UserError(f"{to} is not writable (a read-only file system?)")


def _dir_store(store: Store) -> DirStore:
    if not isinstance(store, DirStore):
        raise UserError(f"{store.url}: a reprotect needs a dir: store, whose replicas the old datastore's "
                        "images become")
    return store


def _check_intact(store: Store, source: str, state: GroupState) -> None:
    damaged = store.damaged(source, state)
    if damaged:
        raise UserError("the point's replicas are damaged: " + "; ".join(damaged.values())
                        + " (the source rebuilds them at its next connection)")


# ------------------------------------------------------------ test failover

def test_failover(store: Store, source: str, group: str, to: Path, fmt: str = "qcow2",
                  point: int | None = None) -> list[str]:
    """Writable images of the group's point under ``to``; the store is not changed."""
    if fmt not in ("qcow2", "raw"):
        raise UserError(f"bad format {fmt!r}: qcow2 or raw")
    _group(store, source, group, point)
    _empty_target(store, to)
    state = _settled(store, source, group)
    if state.fenced:
        raise UserError(f"{source}/{group} is failed over ({state.fenced.get('reason')}); its images are in "
                        f"{state.fenced.get('to')}")
    _group(store, source, group, point)  # the point may have gone with the cycle just applied
    _check_intact(store, source, state)
    state = _point_state(store, source, group, point)
    store.check_point(source, group, state)
    made_to = not to.exists()
    _make_target(to)
    mark = {"store": store.url, "source": source, "group": group, "point": state.cycle_id, "format": fmt,
            "created": time.time()}
    try:
        # The mark first: whatever happens next, `--cleanup` knows the directory as its own.
        atomic_write(to / TEST_MARK, json.dumps({**mark, "complete": False}).encode())
        lines = _test_images(store, source, group, state, to, fmt)
        atomic_write(to / TEST_MARK, json.dumps(mark).encode())
    except BaseException as exc:
        # Half a test failover helps no one, and it would block the next try.
        _remove_test_failover(to, keep_dir=not made_to)
        if isinstance(exc, OSError):
            where = f" ({exc.filename})" if exc.filename else ""
            raise UserError(f"test failover of {source}/{group} to {to} failed: {exc.strerror or exc}{where}; "
                            "nothing of it is left") from None
        raise
    lines.append(f"test failover of {source}/{group} at point {state.cycle_id} "
                 f"(cut {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(state.cut_time))}) is in {to}; "
                 f"replication goes on; `vrfs test-failover --cleanup {to}` removes it")
    return lines


def _test_images(store: Store, source: str, group: str, state: GroupState, to: Path, fmt: str) -> list[str]:
    lines = []
    bases = to / ".vrfs-test-bases"
    for disk in state.disks:
        image = to / disk.path
        image.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        if fmt == "raw" or disk.size < SMALL_FILE:  # configuration, NVRAM: the VM reads them as they are
            store.export_disk(source, group, state, disk, image)
            lines.append(f"{image}: {'raw image' if fmt == 'raw' else 'copy'} of point {state.cycle_id} "
                         f"({_took(started)})")
            crash_point("test-failover-image")
            continue
        base = bases / (disk.path + ".point")
        base.parent.mkdir(parents=True, exist_ok=True)
        store.export_disk(source, group, state, disk, base)
        os.chmod(base, 0o444)  # the point itself never changes; the test VM writes the overlay
        backing_format = _image_format(base)
        _qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", backing_format, str(image))
        lines.append(f"{image}: qcow2 overlay on point {state.cycle_id} ({backing_format}, {_took(started)})")
        crash_point("test-failover-image")
    return lines


def cleanup_test_failover(to: Path) -> list[str]:
    if to.is_symlink():
        raise UserError(f"{to} is a symbolic link; name the test failover's directory itself")
    mark = to / TEST_MARK
    try:
        info = json.loads(mark.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{to} is not a test failover (no {TEST_MARK})") from None
    except (OSError, ValueError):
        raise UserError(f"{mark} is damaged; remove {to} by hand") from None
    if not isinstance(info, dict):
        raise UserError(f"{mark} is damaged; remove {to} by hand")
    _remove_test_failover(to, keep_dir=False)
    return [f"removed the {'unfinished ' if info.get('complete') is False else ''}test failover of "
            f"{info.get('source')}/{info.get('group')} at point {info.get('point')} from {to}"]


def _remove_test_failover(to: Path, keep_dir: bool) -> None:
    """Remove a test failover's directory (or only what is in it), never
    following a symbolic link out of it (shutil.rmtree works on descriptors)
    and never into another file system mounted inside it (a test image's file
    system, mounted to look at it, is unmounted first)."""
    top = os.lstat(to)
    for root, dirs, _files in os.walk(to):
        for name in dirs:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode) and st.st_dev != top.st_dev:
                raise UserError(f"{path} is a mount point: unmount it, then clean up again")
    if keep_dir:
        for entry in os.scandir(to):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    else:
        shutil.rmtree(to)
    fsync_dir(to if keep_dir else to.parent)


def _image_format(path: Path) -> str:
    """The format of a replica (a disk is whatever file the hypervisor wrote: raw, qcow2, ...)."""
    fmt = json.loads(_qemu_img("info", "--output=json", str(path))).get("format", "raw")
    return fmt if fmt in ("raw", "qcow2", "vmdk", "vdi", "vhdx", "vpc", "qed") else "raw"


def _qemu_img(*args: str) -> str:
    try:
        result = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise UserError("qemu-img is needed for qcow2 images (Debian: qemu-utils); or use --format raw") from None
    if result.returncode != 0:
        raise UserError(f"qemu-img {args[0]} failed: {result.stderr.strip()}")
    return result.stdout


# ----------------------------------------------------------------- failover

def failover(store: Store, source: str, group: str, to: Path, point: int | None = None) -> list[str]:
    """Fence the group, then hand its replicas to ``to`` as a datastore: by
    rename where the store's files can be (a dir: store, the newest point,
    the same file system), else by copy."""
    state = _group(store, source, group, point)
    if state.fenced and state.fenced.get("done"):
        raise UserError(f"{source}/{group} is already failed over: {state.fenced.get('reason')}")
    resuming = state.fenced is not None
    if state.fenced is not None and (Path(state.fenced.get("to", "")) != to
                                     or point not in (None, state.fenced.get("point"))):
        raise UserError(f"{source}/{group} is being {state.fenced.get('reason')}; "
                        "run the same command again to finish it")
    if not resuming:
        _failover_target(store, to, group, {d.block_size for d in state.disks})
    newest = _settled(store, source, group)
    if not resuming:
        _group(store, source, group, point)  # the point may have gone with the cycle just applied
        _check_intact(store, source, newest)
    chosen = state.fenced.get("point") if state.fenced is not None else point
    state = _point_state(store, source, group, chosen)
    store.check_point(source, group, state)  # before the fence: a point that cannot be had fences nothing
    block_size = {d.block_size for d in state.disks}
    if len(block_size) > 1:  # before the fence: a failover that cannot finish must not start
        raise UserError(f"{source}/{group}: its disks have different block sizes; a datastore has one")
    lines = []
    fence = {"reason": f"failed over at point {state.cycle_id} to {to}", "to": str(to),
             "point": state.cycle_id, "time": time.time()}
    if not resuming:
        _make_target(to)
        store.save_group(source, group, GroupState(newest.cycle_id, newest.cut_time, newest.disks, fence))
        lines.append(f"{source}/{group}: fenced: cycles from {source} are refused from now on")
        crash_point("failover-fenced")
    try:
        moved_by = _hand_over(store, source, group, state, newest, to)
        _write_lineage(to, source, group, state, block_size.pop() if block_size else 64 << 10)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise UserError(f"failover of {source}/{group} to {to} stopped: {exc.strerror or exc}{where}; the group "
                        "stays fenced: run the same command again to finish it") from None
    store.save_group(source, group, GroupState(newest.cycle_id, newest.cut_time, newest.disks,
                                               {**fence, **(newest.fenced or {}), "done": True}))
    for disk in state.disks:
        lines.append(f"{to / disk.path}: point {state.cycle_id} ({moved_by})")
    lines.append(f"{source}/{group} failed over at point {state.cycle_id} (cut "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(state.cut_time))}); `vrfs mount {to}` "
                 "serves it, tracking from that point")
    return lines


def _hand_over(store: Store, source: str, group: str, state: GroupState, newest: GroupState, to: Path) -> str:
    """The point's images into ``to``: the replicas themselves by rename (a
    dir: store's newest point on the same file system), else copies. Each
    image appears whole (a copy is made under a temporary name), so a run
    interrupted anywhere is finished by the next; returns how they moved."""
    to.mkdir(parents=True, exist_ok=True)
    by_rename = state.cycle_id == newest.cycle_id and isinstance(store, DirStore)
    moved_by = "rename" if by_rename else "copy"
    for disk in state.disks:
        image = to / disk.path
        image.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(f"{image}.tmp")
        try:
            if not by_rename:  # an older point, or devices: its images are made, the replicas stay
                if not image.exists():
                    store.export_disk(source, group, state, disk, temporary)
                    os.replace(temporary, image)
                    crash_point("failover-moved")
                continue
            assert isinstance(store, DirStore)
            replica = store.replica(source, disk.path)
            if image.exists() and not replica.exists():
                continue  # moved by an earlier, interrupted run
            try:
                os.rename(replica, image)
            except OSError as exc:
                if exc.errno != errno.EXDEV:  # another file system: a copy
                    raise
                copy_extents(replica, temporary)
                os.replace(temporary, image)
                moved_by = "copy"
            fsync_dir(image.parent)
            crash_point("failover-moved")
        except OSError:
            temporary.unlink(missing_ok=True)  # its space, for the next try
            raise
    return moved_by


# ---------------------------------------------------------------- reprotect

def reprotect(store: Store, datastore: Path) -> list[str]:
    """The images of a datastore that is no longer served (the old site, after
    a failover) become the seeds of the reverse direction in ``store``, each
    with what its state file knows: the last point its source had
    acknowledged, and the blocks changed after it. A disk failed over at that
    very point then costs only the blocks changed on either side since."""
    try:
        return _reprotect(store, datastore)
    except OSError as exc:  # the store full, say: every step is redone or skipped by the next run
        where = f" ({exc.filename})" if exc.filename else ""
        raise UserError(f"reprotect of {datastore} stopped: {exc.strerror or exc}{where}; run the same command "
                        "again to finish it") from None


def _reprotect(store: Store, datastore: Path) -> list[str]:
    dstore = _dir_store(store)
    _outside_store(store, datastore, "the datastore")
    _not_in_a_vrfs_mount(datastore, "the datastore")
    meta = datastore / STATE_DIR
    if not meta.is_dir():
        raise UserError(f"{datastore} is not a vrfs datastore (no {meta})")
    _not_served(datastore)
    seeds = dstore.seed_dir()
    seeds.mkdir(exist_ok=True)
    lines, seeded = [], set()
    for disk in _tracked(datastore):
        path = disk.path
        disk_id = disk.disk_id
        image = datastore / path
        target = seeds / disk_id.hex()
        info = {"path": path, "size": disk.size, "point": None, "dirty": None}
        if not disk.needs_full_sync and disk.last_ack_cycle:
            # What the tracker recovers, after a clean stop or a crash alike:
            # the checkpoint and every block of an extent that was hot.
            info["point"], info["dirty"] = disk.last_ack_cycle, encode_bitmap(disk.dirty().to_bytes())
        atomic_write(seeds / f"{disk_id.hex()}.json", json.dumps(info).encode())
        try:
            os.rename(image, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            try:
                copy_extents(image, Path(f"{target}.tmp"))
            except OSError:
                Path(f"{target}.tmp").unlink(missing_ok=True)  # its space, for the next try
                raise
            os.replace(f"{target}.tmp", target)
            os.unlink(image)
        crash_point("reprotect-seeded")
        seeded.add(disk_id)
        if info["point"] is not None:
            lines.append(f"{path}: seed of the reverse direction, at point {info['point']} "
                         f"with {disk.dirty_count()} blocks changed after it")
        else:
            lines.append(f"{path}: seed of the reverse direction ({disk.reason or 'never replicated'}: "
                         "it is compared block by block)")
        (meta / TRACKING_DIR / f"{disk.ino}.psf").unlink(missing_ok=True)
    fsync_dir(seeds)
    _remove_empty_dirs(datastore)
    for src, grp, state in store.groups():
        if state.fenced and any(d.disk_id in seeded for d in state.disks):
            store.forget_group(src, grp)
            lines.append(f"{src}/{grp}: its fence is lifted; its disks come back through the seeds")
    if not lines:
        raise UserError(f"{datastore} holds no disk images")
    lines.append(f"now `vrfs serve --store {store.url}` here, and `vrfs mount DATASTORE --peer THIS-HOST:PORT "
                 "--name NAME` where the VMs run: the first cycle moves only what differs")
    return lines



def _remove_empty_dirs(datastore: Path) -> None:
    """The VMs' directories emptied by a reprotect: a failback may then use the datastore again."""
    for root, _dirs, _files in os.walk(datastore, topdown=False):
        path = Path(root)
        if path == datastore or STATE_DIR in path.relative_to(datastore).parts:
            continue
        try:
            path.rmdir()
        except OSError:
            pass  # not empty: something else lives there


def _not_served(datastore: Path) -> None:
    try:
        fd = os.open(datastore / STATE_DIR / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UserError(f"cannot check {datastore}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"{datastore} is served by vrfs mount: stop it first (`vrfs umount`)") from None
    finally:
        os.close(fd)


def _tracked(datastore: Path) -> list[Disk]:
    """The datastore's disks as its tracker recovers them (vrfs/tracker.py), read only."""
    try:
        config = json.loads((datastore / STATE_DIR / CONFIG_NAME).read_bytes())
        block_size, extent_size = int(config["block_size"]), int(config["extent_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{datastore}: cannot read its settings ({exc})") from None
    root_fd = os.open(datastore, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        state_fd = os.open(datastore / STATE_DIR / TRACKING_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        os.close(root_fd)
        raise UserError(f"{datastore} has no tracking state") from None
    try:
        tracker = Tracker(state_fd, root_fd, block_size, extent_size)
        tracker.load()
        return sorted(tracker.disks.values(), key=lambda d: d.path)
    finally:
        os.close(state_fd)
        os.close(root_fd)


def _write_lineage(to: Path, source: str, group: str, state: GroupState, block_size: int) -> None:
    """State files that say each disk is exactly at the point (clean, nothing
    dirty, its identity kept), the datastore's settings, and where it came from."""
    meta = to / STATE_DIR
    (meta / TRACKING_DIR).mkdir(parents=True, exist_ok=True)
    config = meta / CONFIG_NAME
    if not config.exists():
        atomic_write(config, json.dumps({"block_size": block_size, "extent_size": DEFAULT_EXTENT_SIZE}).encode())
    lineage_file, generations_file = meta / LINEAGE_FILE, meta / GENERATIONS_FILE
    try:
        lineage = json.loads(lineage_file.read_bytes())
    except FileNotFoundError:
        lineage = {}
    try:
        generations = json.loads(generations_file.read_bytes())
    except FileNotFoundError:
        generations = {}
    for disk in state.disks:
        st = os.lstat(to / disk.path)
        if not stat.S_ISREG(st.st_mode):
            continue
        atomic_write(meta / TRACKING_DIR / f"{st.st_ino}.psf", _clean_state(disk, st).encode())
        lineage[disk.disk_id.hex()] = {"source": source, "group": group, "path": disk.path,
                                       "point": state.cycle_id, "cut_time": state.cut_time}
        # A new generation: the copy left at the old site stays in the old one.
        history = list(disk.history or (disk.disk_id.hex(),))
        generations[disk.disk_id.hex()] = (history + [uuid.uuid4().hex])[-MAX_HISTORY:]
    atomic_write(lineage_file, json.dumps(lineage, indent=1).encode())
    atomic_write(generations_file, json.dumps(generations, indent=1).encode())


def _clean_state(disk: DiskEntry, st: os.stat_result) -> DiskState:
    return DiskState(disk_id=disk.disk_id, path=disk.path, block_size=disk.block_size,
                     extent_size=DEFAULT_EXTENT_SIZE, ino=st.st_ino, size=st.st_size, ctime_ns=st.st_ctime_ns,
                     clean=True)


def _took(started: float) -> str:
    return f"{time.monotonic() - started:.1f} s"
