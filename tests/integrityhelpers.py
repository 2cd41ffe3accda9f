"""Model-based integrity testing of a real vrfs mount replicating to a real
`vrfs serve` (tests/test_integrity.py).

`Model` is what the datastore should hold: path -> bytearray, hard links share
one bytearray. An `Op` is one operation or fault as data (so a failing
sequence can be written down and replayed), `Rig` runs the processes, applies
ops to the mount and to the model, and checks convergence independently of
the product: the files under SRC (without .vrfs) and under STORE/hv1 are
compared by path, size and sha256, and `vrfs status --json` must list exactly
the source's files, all in sync.

Per-disk settings (docs/settings.md) are modelled too: what each disk set
through the mount (`user.vrfs.rpo|compression|priority`, kept with the
model's file object, so it follows renames, exchanges and hard links, and is
gone with a deleted or replaced file or a lost state file), the rules of the
rig's `--config` file and the mount's options. Every name of every disk must
show the effective value, and status the disk's and its group's RPO.

Every process is ended by its PID, every mount removed (lazily if it must
be); the only network traffic is to 127.0.0.1.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import hashlib
import json
import os
import random
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mounthelpers import Mount, is_mounted, vrfs
from servehelpers import Server, free_port
from vrfs import fs

KiB = 1 << 10
MiB = 1 << 20
BS = 64 * KiB
NAME = "hv1"
MAX_FILE = 3 * MiB  # no file grows past this: steps stay fast
RETAIN_SLOT = 1  # seconds: the receiver keeps the newest point of every second, for an hour
RETAIN_POLICY = f"1h:{RETAIN_SLOT}s"
TEST_MARK = ".vrfs-test-failover.json"
SETTING_KEYS = ("rpo", "compression", "priority")
MOUNT_COMPRESSION = 1  # `vrfs mount --compress-level` default
MOUNT_PRIORITY = 0

AT_FDCWD = -100


def punch_hole(fd: int, offset: int, length: int) -> None:
    fs.fallocate(fd, fs.FALLOC_FL_PUNCH_HOLE | fs.FALLOC_FL_KEEP_SIZE, offset, length)


def renameat2(old: Path, new: Path, flags: int) -> None:
    fs.renameat2(AT_FDCWD, str(old), str(new), flags)  # absolute paths: the dir fd is not used


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path, skip_vrfs: bool = True, volatile: bool = False) -> dict[str, tuple[int, str, int]]:
    """Regular files under root: relative path -> (size, sha256, inode).
    ``volatile``: the tree may change meanwhile (the receiver removes the
    replicas of a group left without disks): a file gone between listing and
    reading is left out, and the caller looks again."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == "." and skip_vrfs and ".vrfs" in dirnames:
            dirnames.remove(".vrfs")
        for name in filenames:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
                if not (st.st_mode & 0o170000 == 0o100000):
                    continue
                with open(p, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                if not volatile:
                    raise
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            out[rel] = (len(data), sha(data), st.st_ino)
    return out


def dirs_under(root: Path, skip_vrfs: bool = True) -> set[str]:
    out = set()
    for dirpath, dirnames, _ in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == "." and skip_vrfs and ".vrfs" in dirnames:
            dirnames.remove(".vrfs")
        for d in dirnames:
            out.add(d if rel_dir == "." else f"{rel_dir}/{d}")
    return out


def group_of(path: str) -> str:
    return path.split("/", 1)[0]


def verify_available() -> bool:
    """`vrfs verify` is being written; content damage at the DR site is only
    found by it."""
    return vrfs("verify", "--help", check=False).returncode == 0


# ------------------------------------------------------------------ model

class Model:
    """What the datastore should hold. Hard links share one bytearray."""

    def __init__(self) -> None:
        self.files: dict[str, bytearray] = {}
        self.dirs: set[str] = set()
        # Settings made through the mount, per file object (id -> (the object,
        # key -> value)): the entry holds the object, so its id is not reused.
        self.own: dict[int, tuple[bytearray, dict[str, float | int]]] = {}

    def own_of(self, path: str) -> dict[str, float | int]:
        entry = self.own.get(id(self.files[path]))
        return entry[1] if entry is not None else {}

    def set_own(self, path: str, key: str, value: float | int) -> None:
        data = self.files[path]
        self.own.setdefault(id(data), (data, {}))[1][key] = value

    def clear_own(self, path: str, key: str | None = None) -> None:
        """One key, or all of them (the disk's identity is lost)."""
        entry = self.own.get(id(self.files[path]))
        if entry is None:
            return
        if key is None:
            entry[1].clear()
        else:
            entry[1].pop(key, None)
        if not entry[1]:
            del self.own[id(self.files[path])]

    def prune_own(self) -> None:
        live = {id(d) for d in self.files.values()}
        self.own = {k: v for k, v in self.own.items() if k in live}

    def groups(self) -> set[str]:
        return {group_of(p) for p in self.files} | {d for d in self.dirs if "/" not in d}

    def group_dirs(self) -> list[str]:
        return sorted(d for d in self.dirs if "/" not in d)

    def objects(self) -> list[list[str]]:
        """The names of each distinct file (one list per inode)."""
        by_id: dict[int, list[str]] = {}
        for p, data in sorted(self.files.items()):
            by_id.setdefault(id(data), []).append(p)
        return list(by_id.values())

    def names_of(self, path: str) -> list[str]:
        data = self.files[path]
        return sorted(p for p, d in self.files.items() if d is data)

    def exists(self, path: str) -> bool:
        return path in self.files or path in self.dirs

    def parent_exists(self, path: str) -> bool:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        return parent == "" or parent in self.dirs

    def move_prefix(self, old: str, new: str) -> None:
        """Rename of a directory: everything below it follows."""
        def moved(p: str) -> str | None:
            if p == old:
                return new
            if p.startswith(old + "/"):
                return new + p[len(old):]
            return None
        self.files = {moved(p) or p: d for p, d in self.files.items()}
        self.dirs = {moved(p) or p for p in self.dirs}

    def exchange_prefix(self, a: str, b: str) -> None:
        def swapped(p: str) -> str:
            for x, y in ((a, b), (b, a)):
                if p == x:
                    return y
                if p.startswith(x + "/"):
                    return y + p[len(x):]
            return p
        self.files = {swapped(p): d for p, d in self.files.items()}
        self.dirs = {swapped(p) for p in self.dirs}


def zero_range(data: bytearray, offset: int, length: int) -> None:
    end = min(len(data), offset + length)
    if offset < end:
        data[offset:end] = bytes(end - offset)


def resize(data: bytearray, size: int) -> None:
    if size < len(data):
        del data[size:]
    else:
        data.extend(bytes(size - len(data)))


def write_at(data: bytearray, offset: int, chunk: bytes) -> None:
    if offset > len(data):
        data.extend(bytes(offset - len(data)))
    data[offset:offset + len(chunk)] = chunk


def content(rng: random.Random, size: int) -> bytes:
    """VM-like bytes: runs of random data, zeros and a repeated pattern."""
    out = bytearray()
    while len(out) < size:
        n = min(size - len(out), rng.choice([rng.randrange(1, 5000), rng.randrange(1, 3 * BS),
                                              rng.randrange(BS, 8 * BS)]))
        kind = rng.randrange(4)
        if kind == 0:
            out += bytes(n)
        elif kind == 1:
            out += bytes([rng.randrange(1, 256)]) * n
        else:
            out += rng.randbytes(n)
    return bytes(out)


# --------------------------------------------------------------------- ops

@dataclass
class Op:
    """One operation through the mount, or one fault. `args` are plain data
    (paths, offsets, bytes) so a sequence can be written down and replayed."""
    kind: str
    args: dict = field(default_factory=dict)
    fault: bool = False
    label: str = ""  # the kind for statistics and KNOWN_BROKEN, e.g. rename-over-across

    def __post_init__(self) -> None:
        self.label = self.label or self.kind

    def describe(self) -> str:
        parts = []
        for k, v in self.args.items():
            if isinstance(v, (bytes, bytearray)):
                nz = "zeros" if not any(v) else f"sha {sha(v)[:8]}"
                parts.append(f"{k}=<{len(v)} bytes, {nz}>")
            else:
                parts.append(f"{k}={v!r}")
        tag = f"[{self.label}] " if self.label != self.kind else ""
        return f"{'FAULT ' if self.fault else ''}{tag}{self.kind}({', '.join(parts)})"


class CheckFailed(AssertionError):
    pass


class Rig:
    """A source datastore SRC mounted at MNT with --peer, and its receiver
    serving STORE. Applies ops to both the mount and the model, and checks."""

    def __init__(self, tmp: Path, rpo: str = "1s", converge_timeout: float = 40.0, retain: bool = False,
                 config: Config | None = None) -> None:
        self.tmp = tmp
        self.src = tmp / "src"
        self.mnt = tmp / "mnt"
        self.store = tmp / "store"
        for d in (self.src, self.mnt):
            d.mkdir(exist_ok=True)
        self.rpo = rpo
        self.converge_timeout = converge_timeout
        self.port = free_port()
        self.server = Server(f"dir:{self.store}", tmp / "serve.log", port=self.port)
        # The layers under a disk's own settings: the mount's options, and the
        # rules of a --config file if the rig has one.
        self.config = config
        self.mount_defaults = {"rpo": seconds(rpo), "compression": MOUNT_COMPRESSION, "priority": MOUNT_PRIORITY}
        config_args: tuple[str, ...] = ()
        if config is not None:
            (tmp / "vrfs.toml").write_text(config.toml())
            config_args = ("--config", str(tmp / "vrfs.toml"))
        self.mount = Mount(self.src, self.mnt, tmp / "mount.log", "--peer", f"127.0.0.1:{self.port}",
                           "--name", NAME, "--rpo", rpo, *config_args)
        self.model = Model()
        self.history: list[str] = []
        self.ops = Counter()
        self.faults = Counter()
        self.checks = Counter()
        self.has_verify: bool | None = None
        # With retain, the receiver keeps a point per second (`--retain`), and
        # every point a strict convergence saw is recorded with what the
        # source held: (group, point id) -> path -> (size, sha256). Each must
        # come back from `vrfs test-failover` byte for byte, for as long as
        # the policy keeps it.
        self.retain = retain
        self.recorded: dict[tuple[str, int], dict[str, tuple[int, str]]] = {}
        if retain:
            self.server.args = ("--retain", RETAIN_POLICY)

    # ---------------------------------------------------------- processes

    def start(self) -> "Rig":
        self.server.start()
        self.mount.start()
        return self

    def close(self) -> None:
        """Whatever happened: no mount, no process of ours."""
        try:
            self.mount.cleanup()
        finally:
            self.server.stop()

    def remount(self) -> None:
        self.mount.start()

    def umount(self) -> None:
        self.mount.umount()
        assert not is_mounted(self.mnt)

    # ------------------------------------------------------------ applying

    def apply(self, op: Op, step: int | str = "-") -> None:
        self.history.append(f"{step}: {op.describe()}")
        (self.faults if op.fault else self.ops)[op.label] += 1
        getattr(self, "do_" + op.kind)(**op.args)

    def m(self, path: str) -> Path:
        return self.mnt / path

    def replica(self, path: str) -> Path:
        return self.store / NAME / path

    # Operations through the mount -------------------------------------

    def do_mkdir(self, path: str) -> None:
        os.mkdir(self.m(path))
        self.model.dirs.add(path)

    def do_create(self, path: str, data: bytes) -> None:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent and parent not in self.model.dirs:
            os.makedirs(self.m(parent))
            parts = parent.split("/")
            for i in range(1, len(parts) + 1):
                self.model.dirs.add("/".join(parts[:i]))
        fd = os.open(self.m(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if data:
                os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.model.files[path] = bytearray(data)

    def do_write(self, path: str, offset: int, data: bytes) -> None:
        fd = os.open(self.m(path), os.O_RDWR)
        try:
            assert os.pwrite(fd, data, offset) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
        write_at(self.model.files[path], offset, data)

    def do_truncate(self, path: str, size: int) -> None:
        os.truncate(self.m(path), size)
        resize(self.model.files[path], size)

    def do_punch(self, path: str, offset: int, length: int) -> None:
        fd = os.open(self.m(path), os.O_RDWR)
        try:
            punch_hole(fd, offset, length)
            os.fsync(fd)
        finally:
            os.close(fd)
        zero_range(self.model.files[path], offset, length)

    def do_delete(self, path: str, rmdirs: bool = False) -> None:
        os.unlink(self.m(path))
        del self.model.files[path]
        if rmdirs:  # remove the directories this emptied, up to the top
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            while parent:
                if any(p.startswith(parent + "/") for p in self.model.files) or \
                        any(d.startswith(parent + "/") for d in self.model.dirs):
                    break
                os.rmdir(self.m(parent))
                self.model.dirs.discard(parent)
                parent = parent.rsplit("/", 1)[0] if "/" in parent else ""

    def do_rename(self, old: str, new: str) -> None:
        """rename(2) of a file, onto a free name or over an existing file."""
        os.rename(self.m(old), self.m(new))
        files = self.model.files
        if new in files and files[new] is files[old]:
            return  # both names are links to one file: rename(2) does nothing
        files[new] = files.pop(old)

    def do_rename_dir(self, old: str, new: str) -> None:
        os.rename(self.m(old), self.m(new))
        self.model.move_prefix(old, new)

    def do_exchange(self, a: str, b: str) -> None:
        """renameat2(RENAME_EXCHANGE) of two files or two directories."""
        renameat2(self.m(a), self.m(b), fs.RENAME_EXCHANGE)
        if a in self.model.files:
            f = self.model.files
            f[a], f[b] = f[b], f[a]
        else:
            self.model.exchange_prefix(a, b)

    def do_link(self, old: str, new: str) -> None:
        os.link(self.m(old), self.m(new))
        self.model.files[new] = self.model.files[old]

    def do_sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    # Per-disk settings through the mount --------------------------------

    def do_set_setting(self, path: str, key: str, text: bytes, value: float | int | None = None,
                       error: str | None = None) -> None:
        """setxattr user.vrfs.KEY: ``value`` is what it must take effect as;
        with ``error`` (an errno name) it must fail so and change nothing."""
        self.checks["settings_ops"] += 1
        is_disk = path in self.model.files  # a directory takes no setting (EPERM)
        before = self._read_settings(path) if is_disk else None
        try:
            os.setxattr(self.m(path), f"user.vrfs.{key}", text)
        except OSError as exc:
            if error is None or exc.errno != getattr(errno, error):
                raise CheckFailed(f"setxattr {path} user.vrfs.{key}={text!r}: {exc}, expected "
                                  f"{error or 'success'}") from None
            after = self._read_settings(path) if is_disk else None
            if after != before:
                raise CheckFailed(f"refused setxattr {path} user.vrfs.{key}={text!r} changed {before} "
                                  f"to {after}") from None
            return
        if error is not None:
            raise CheckFailed(f"setxattr {path} user.vrfs.{key}={text!r} succeeded, expected {error}")
        if path in self.model.files:
            self.model.set_own(path, key, value)

    def do_remove_setting(self, path: str, key: str) -> None:
        """removexattr user.vrfs.KEY: back to the rule or the mount's option;
        ENODATA when the disk did not set it."""
        self.checks["settings_ops"] += 1
        was_set = key in self.model.own_of(path)
        try:
            os.removexattr(self.m(path), f"user.vrfs.{key}")
        except OSError as exc:
            if was_set or exc.errno != errno.ENODATA:
                raise CheckFailed(f"removexattr {path} user.vrfs.{key} (set: {was_set}): {exc}") from None
            return
        if not was_set:
            raise CheckFailed(f"removexattr {path} user.vrfs.{key} succeeded, but the disk had not set it")
        self.model.clear_own(path, key)

    def _read_settings(self, path: str) -> dict[str, float | int]:
        return {k: read_setting(k, os.getxattr(self.m(path), f"user.vrfs.{k}")) for k in SETTING_KEYS}

    # Faults at the protected site ---------------------------------------

    def do_remount(self) -> None:
        self.umount()
        self.remount()

    def do_kill_mount(self) -> None:
        self.mount.kill()
        assert not is_mounted(self.mnt)
        self.remount()

    def _state_files(self) -> list[str]:
        return sorted(glob.glob(str(self.src / ".vrfs" / "state" / "*.psf")))

    def _state_file_of(self, path: str) -> Path:
        return self.src / ".vrfs" / "state" / f"{os.stat(self.src / path).st_ino}.psf"

    def do_lost_state(self, path: str | None) -> None:
        """With the datastore unmounted, the state file of one disk (or of
        every disk: path None) is lost."""
        self.umount()
        victims = self._state_files() if path is None else [str(self._state_file_of(path))]
        # Without its state file a disk has a new identity: what it set through the mount is gone.
        for p in list(self.model.files) if path is None else [path]:
            self.model.clear_own(p)
        for v in victims:
            try:
                os.unlink(v)
            except FileNotFoundError:
                pass
        self.remount()

    def do_corrupt_state(self, path: str, how: str, seed: int) -> None:
        """With the datastore unmounted, one disk's state file is cut short or
        has garbage written over part of it."""
        self.umount()
        sf = self._state_file_of(path)
        if sf.exists():
            self.model.clear_own(path)  # a damaged state file is refused: a new identity
            rng = random.Random(seed)
            size = sf.stat().st_size
            if how == "truncate":
                os.truncate(sf, rng.randrange(0, max(1, size)))
            else:
                with open(sf, "r+b") as f:
                    off = rng.randrange(0, max(1, size))
                    f.seek(off)
                    old = f.read(64)
                    f.seek(off)
                    f.write(bytes(b ^ 0xA5 for b in old) or b"\xa5" * 64)
        self.remount()

    def do_replace_mv(self, path: str, data: bytes) -> None:
        """With the datastore unmounted, an image is replaced by `mv` of
        another file over it: a new inode under the old name."""
        self.umount()
        target = self.src / path
        tmp = target.parent / f".replace-{os.getpid()}.tmp"
        tmp.write_bytes(data)
        subprocess.run(["mv", "-f", str(tmp), str(target)], check=True, capture_output=True)
        self.model.files[path] = bytearray(data)  # the other hard links (if any) keep the old file
        self.remount()

    # Faults at the DR site ---------------------------------------------

    def do_kill_receiver(self) -> None:
        self.server.kill9()
        self.server.start()

    def do_restart_receiver(self) -> None:
        self.server.stop()
        self.server.start()

    # A replica changed by hand at the DR site changes the older points built
    # on it too (a point is the replica plus the blocks changed after it):
    # that group's recorded points are no longer what the store can give.

    def do_dr_delete(self, replica: str) -> None:
        self._forget_points(replica)
        os.unlink(self.replica(replica))

    def do_dr_truncate(self, replica: str, size: int) -> None:
        self._forget_points(replica)
        os.truncate(self.replica(replica), size)

    def _forget_points(self, replica: str) -> None:
        for key in [k for k in self.recorded if k[0] == group_of(replica)]:
            del self.recorded[key]

    def do_dr_damage(self, replica: str, offset: int, length: int) -> None:
        self._forget_points(replica)
        with open(self.replica(replica), "r+b") as f:
            f.seek(offset)
            old = f.read(length)
            f.seek(offset)
            f.write(bytes(b ^ 0x5A for b in old))

    def do_verify_repair(self) -> None:
        r = vrfs("verify", str(self.mnt), "--repair", check=False, timeout=120)
        self.history.append(f"   verify --repair: exit {r.returncode}: {(r.stdout + r.stderr).strip()[-300:]}")

    # ------------------------------------------------------------- checks

    def check_source(self) -> None:
        """The datastore behaves like a plain directory: SRC and MNT both hold
        exactly the model."""
        self.checks["source"] += 1
        want = {p: (len(d), sha(d)) for p, d in self.model.files.items()}
        for root in (self.src, self.mnt):
            got = files_under(root)
            got_plain = {p: (s, h) for p, (s, h, _) in got.items()}
            if got_plain != want:
                raise CheckFailed(f"{root} differs from the model:\n" + diff(want, got_plain))
            dirs = dirs_under(root)
            if dirs != self.model.dirs:
                raise CheckFailed(f"{root}: directories {sorted(dirs)} != model {sorted(self.model.dirs)}")
            # Hard links: names of one model file share an inode, others don't.
            inos = {}
            for names in self.model.objects():
                ids = {got[n][2] for n in names}
                if len(ids) != 1:
                    raise CheckFailed(f"{root}: hard links {names} are not one inode: {ids}")
                ino = ids.pop()
                if ino in inos:
                    raise CheckFailed(f"{root}: {names} and {inos[ino]} share inode {ino}")
                inos[ino] = names

    def expected_settings(self, path: str, tracked: str) -> dict[str, float | int]:
        """What the disk named ``path`` must show: its own setting, else the
        last rule of the configuration file that matches the name it
        replicates under, else the mount's option."""
        own = self.model.own_of(path)
        out = {}
        for key in SETTING_KEYS:
            if key in own:
                out[key] = own[key]
                continue
            out[key] = self.mount_defaults[key]
            for glob_, values in reversed(self.config.rules() if self.config else []):
                if key in values and fnmatch.fnmatchcase(tracked, glob_):
                    out[key] = values[key]
                    break
        return out

    def check_settings(self) -> None:
        """Every name of every disk shows its effective settings; status shows
        the disk's RPO and its group's (the smallest of its disks')."""
        self.checks["settings_checks"] += 1
        self.model.prune_own()
        disks = {d["path"]: d for d in self.status()["disks"]}
        group_rpo: dict[str, float] = {}
        problems = []
        for names in self.model.objects():
            listed = [n for n in names if n in disks]
            tracked = listed[0] if len(listed) == 1 else names[0]
            want = self.expected_settings(names[0], tracked)
            group_rpo[group_of(tracked)] = min(group_rpo.get(group_of(tracked), want["rpo"]), want["rpo"])
            for n in names:
                got = self._read_settings(n)
                self.checks["xattrs_read"] += len(got)
                listed_attrs = set(os.listxattr(self.m(n)))
                if not {f"user.vrfs.{k}" for k in SETTING_KEYS} <= listed_attrs:
                    problems.append(f"{n}: listxattr {sorted(listed_attrs)} lacks a setting")
                if got != want:
                    problems.append(f"{n} (replicates as {tracked}): xattrs {got}, expected {want} "
                                    f"(own {self.model.own_of(n)})")
            d = disks.get(tracked)
            if d is not None and d.get("disk_rpo_seconds") != want["rpo"]:
                problems.append(f"{tracked}: status disk_rpo_seconds {d.get('disk_rpo_seconds')}, expected "
                                f"{want['rpo']}")
        for p, d in disks.items():
            g = group_of(p)
            if g in group_rpo and d.get("rpo_seconds") != group_rpo[g]:
                problems.append(f"{p}: status rpo_seconds {d.get('rpo_seconds')}, expected its group's "
                                f"{group_rpo[g]}")
        if problems:
            raise CheckFailed("settings differ from the model:\n" + "\n".join(problems))

    def status(self) -> dict:
        from vrfs.status import mount_status
        return mount_status(str(self.mnt))

    def _status_problems(self, st: dict) -> list[str]:
        disks = {d["path"]: d for d in st["disks"]}
        problems = []
        if not st.get("connected", True):
            problems.append("not connected")
        for names in self.model.objects():
            listed = [n for n in names if n in disks]
            if len(listed) != 1:
                problems.append(f"{names}: status lists {listed}")
        known = set(self.model.files)
        for p, d in disks.items():
            if p not in known:
                problems.append(f"{p}: in status, not in the source")
            elif d["state"] != "in-sync" or d["dirty_blocks"] or not d["last_point"] or d["lag_seconds"]:
                problems.append(f"{p}: {d['state']} dirty={d['dirty_blocks']} point={d['last_point']} "
                                f"lag={d['lag_seconds']} {d.get('reason', '')} {d.get('error', '')}")
        return problems

    def _replica_problems(self, listed: set[str]) -> tuple[list[str], list[str]]:
        """(mismatches in groups with disks listed in sync, leftovers in groups without disks)."""
        got = {p: (s, h) for p, (s, h, _) in files_under(self.store / NAME, skip_vrfs=False, volatile=True).items()} \
            if (self.store / NAME).exists() else {}
        want = {p: (len(self.model.files[p]), sha(self.model.files[p])) for p in listed}
        live_groups = {group_of(p) for p in listed}
        strict, leftover = [], []
        for p in sorted(set(got) | set(want)):
            if got.get(p) == want.get(p):
                continue
            line = f"{p}: replica {got.get(p)} source {want.get(p)}"
            (strict if group_of(p) in live_groups else leftover).append(line)
        return strict, leftover

    def converge(self, lenient: bool = False, timeout: float | None = None) -> None:
        """Wait until status shows every disk in sync with a point; then every
        replica must equal its source at that moment (unless lenient: DR-side
        damage the product cannot know of until something makes it look).
        Groups without any disk left cannot show in status: their replicas
        are waited for until the deadline."""
        self.checks["converge"] += 1
        deadline = time.monotonic() + (timeout or self.converge_timeout)
        last: list[str] = []
        while True:
            try:
                st = self.status()
            except Exception as exc:  # noqa: BLE001 - the daemon is gone: report it
                raise CheckFailed(f"status failed: {exc}") from None
            problems = self._status_problems(st)
            if not problems:
                listed = {d["path"] for d in st["disks"]}
                strict, leftover = self._replica_problems(listed)
                if strict and not lenient:
                    raise CheckFailed("status says in-sync but replicas differ from the source:\n"
                                      + "\n".join(strict) + "\nstatus:\n" + json.dumps(st["disks"], indent=1))
                if not strict and not leftover:
                    if self.retain and not lenient:
                        self._record_points(st)
                    break
                problems = strict + leftover
            last = problems
            if time.monotonic() > deadline:
                raise CheckFailed(f"no convergence in {timeout or self.converge_timeout:.0f}s:\n"
                                  + "\n".join(last))
            time.sleep(0.1)
        self.checks["bytes_compared"] += sum(len(d) for d in {id(d): d for d in self.model.files.values()}.values())
        self.checks["files_compared"] += len(self.model.objects())
        # The command line says the same. It reads status a moment later: a
        # link whose receiver was just killed may only now be seen to have
        # dropped (the disks then show "disconnected" until the shipper is
        # back), so it gets until the deadline, and at least 10 s, to agree.
        deadline = max(deadline, time.monotonic() + 10)
        while True:
            cli = json.loads(vrfs("status", str(self.mnt), "--json").stdout)
            bad = self._status_problems({"disks": cli})
            if not bad:
                break
            if time.monotonic() > deadline:
                raise CheckFailed("vrfs status --json disagrees after convergence:\n" + "\n".join(bad))
            time.sleep(0.2)

    def check(self, lenient: bool = False) -> None:
        self.check_source()
        self.check_settings()
        self.converge(lenient=lenient)
        self.check_settings()  # and still so once every group has shipped

    # ------------------------------------------------------- kept points

    def _record_points(self, st: dict) -> None:
        points: dict[str, set] = {}
        for d in st["disks"]:
            points.setdefault(group_of(d["path"]), set()).add((d.get("last_point") or {}).get("id"))
        for group, ids in points.items():
            if len(ids) != 1:
                raise CheckFailed(f"{group}: its disks are in sync at different points {ids}")
            point = ids.pop()
            listed = [d["path"] for d in st["disks"] if group_of(d["path"]) == group]
            self.recorded[(group, point)] = {p: (len(self.model.files[p]), sha(self.model.files[p])) for p in listed}
        # The next cut falls in another slot of the policy: this point stays the newest of its slot.
        time.sleep(RETAIN_SLOT + 0.05)

    def check_points(self, rng: random.Random, sample: int | None) -> None:
        """Recorded points (``sample`` of them, or all) from `vrfs test-failover
        --format raw` against what the source held when they were seen."""
        keys = sorted(self.recorded)
        for group, point in keys if sample is None else rng.sample(keys, min(sample, len(keys))):
            listed = json.loads(vrfs("points", "--store", f"dir:{self.store}", f"{NAME}/{group}", "--json",
                                     check=False).stdout or "[]")
            if point not in {p["id"] for p in listed}:
                raise CheckFailed(f"point {point} of {group}, seen in sync, is not kept: the store has "
                                  f"{[p['id'] for p in listed]}")
            to = self.tmp / "test-failover"
            r = vrfs("test-failover", "--store", f"dir:{self.store}", f"{NAME}/{group}", "--point", str(point),
                     "--to", str(to), "--format", "raw", check=False, timeout=120)
            if r.returncode != 0:
                raise CheckFailed(f"test failover of point {point} of {group}: {r.stderr.strip()}")
            try:
                got = {p: (size, h) for p, (size, h, _) in files_under(to).items() if p != TEST_MARK}
            finally:
                vrfs("test-failover", "--cleanup", str(to))
            want = self.recorded[(group, point)]
            if got != want:
                raise CheckFailed(f"point {point} of {group} differs from what the source held at its cut:\n"
                                  + diff(want, got))
            self.checks["points_compared"] += 1
            self.checks["point_bytes_compared"] += sum(size for size, _ in want.values())

    def logs(self) -> str:
        def tail(p: Path, n: int) -> str:
            try:
                return p.read_text(errors="replace")[-n:]
            except FileNotFoundError:
                return "(none)"
        return (f"--- mount log (tail) ---\n{tail(self.mount.log_path, 4000)}\n"
                f"--- serve log (tail) ---\n{tail(self.server.log_path, 3000)}")


# ------------------------------------------------------------- settings

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str) -> float:
    """'2s', '90', '1m' -> seconds (the test's own reading of a duration)."""
    text = text.strip()
    unit = text[-1] if text and text[-1] in "smhd" else ""
    return float(text[:len(text) - len(unit)]) * _UNITS[unit]


def read_setting(key: str, raw: bytes) -> float | int:
    text = raw.decode()
    return seconds(text) if key == "rpo" else int(text)


@dataclass
class Config:
    """A `vrfs mount --config` file: [default] values and [[rule]]s of globs."""
    default: dict = field(default_factory=dict)
    rule_list: list[tuple[str, dict]] = field(default_factory=list)

    def rules(self) -> list[tuple[str, dict]]:
        """In order; [default] is a rule that matches every disk, first."""
        parsed = [("*", self.default)] + self.rule_list
        return [(g, {k: seconds(v) if k == "rpo" else v for k, v in values.items()}) for g, values in parsed]

    def toml(self) -> str:
        def table(values: dict) -> str:
            return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
        out = "[default]\n" + table(self.default)
        for glob_, values in self.rule_list:
            out += f"\n[[rule]]\nmatch = {json.dumps(glob_)}\n" + table(values)
        return out


def diff(want: dict, got: dict) -> str:
    lines = []
    for p in sorted(set(want) | set(got)):
        if want.get(p) != got.get(p):
            lines.append(f"  {p}: expected {want.get(p)}, found {got.get(p)}")
    return "\n".join(lines)
