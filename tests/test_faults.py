"""Fault injection during steady writes, where nothing may be lost.

Real FUSE mounts and real `vrfs serve` processes (tests/sitehelpers.py,
tests/servehelpers.py); a writer thread keeps writing to a two-disk group
through the mount with O_DIRECT (every write reaches vrfs before pwrite
returns, as one request, so the group's possible points are exactly the
states after each write) and records each state's hashes. Faults:

1. kill -9 of the mount's daemon or of `vrfs serve` at random moments;
2. a network partition (the receiver in a network namespace of its own,
   the veth link taken down and up again);
3. the store's file system full, then freed;
4. the source's state directory (SRC/.vrfs) full, then freed;
5. state files deleted or corrupted while unmounted (and while mounted);
6. replicas deleted or corrupted by hand at the DR site.

Invariants, counted: a replica is at a point (its group's bytes equal a
recorded state of the source) whenever it is looked at mid-run; after
recovery it is byte-identical to the source; no full sync unless tracking
state was lost (the mount log's full-sync lines); every fault shows in
status with a reason; the source holds every write the writer was told
succeeded.

Seed: VRFS_FAULT_SEED=N (printed with the figures). Number of kills in the
default run: VRFS_FAULT_KILLS (default 20). Replay:
    VRFS_FAULT_SEED=N python -m pytest tests/test_faults.py -k kill9 -p no:cacheprovider
(the moments are seeded; the processes' timing is not, so a replay is close,
not exact). Figures go to the terminal and to $VRFS_FAULT_REPORT
(default /tmp/vrfs-faults-report.txt).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import xxhash

from mounthelpers import is_mounted, vrfs
from servehelpers import losetup, losetup_detach
from sitehelpers import NAME, Site, run, tree
from wanhelpers import netns
from vrfs.errors import UserError
from vrfs.statefile import CorruptStateFile, DiskState
from vrfs.status import mount_status
from vrfs.store import store_status

KiB, MiB = 1 << 10, 1 << 20
GROUP = "vm1"
DISKS = {"disk0.raw": 4 * MiB, "disk1.raw": 2 * MiB}
SEED = int(os.environ.get("VRFS_FAULT_SEED") or random.SystemRandom().randrange(1 << 31))
KILLS = int(os.environ.get("VRFS_FAULT_KILLS", "20"))
SLOW_KILLS = int(os.environ.get("VRFS_FAULT_SLOW_KILLS", "300"))
REPORT = Path(os.environ.get("VRFS_FAULT_REPORT", "/tmp/vrfs-faults-report.txt"))
FULL_SYNC_LINE = re.compile(r"full sync: comparing|full sync from point")

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(not Path("/dev/fuse").exists() or os.geteuid() != 0, reason="needs FUSE and root"),
]

STATS: Counter = Counter()
FAULTS: Counter = Counter()
CHECKS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def figures(request):
    started = time.monotonic()
    yield
    lines = [f"vrfs fault suite: seed {SEED} (replay: VRFS_FAULT_SEED={SEED} python -m pytest tests/test_faults.py)",
             f"  wall time {time.monotonic() - started:.1f} s, iterations {STATS['iterations']}, "
             f"writes {STATS['writes']} ({STATS['bytes_written']} bytes), states recorded {STATS['states']}",
             "  faults: " + (", ".join(f"{k} {v}" for k, v in sorted(FAULTS.items())) or "none")
             + f" (total {sum(FAULTS.values())})",
             "  invariant checks: " + ", ".join(f"{k} {v}" for k, v in sorted(CHECKS.items()))
             + f" (total {sum(v for k, v in CHECKS.items() if k != 'bytes compared')})",
             f"  bytes compared: {CHECKS['bytes compared']}"]
    text = "\n".join(lines)
    with REPORT.open("a") as f:
        f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + text + "\n")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if capman is not None and reporter is not None:
        with capman.global_and_fixture_disabled():
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)
    else:
        print(text)


def where(seed: int, what: str) -> str:
    return f"[seed {seed}: VRFS_FAULT_SEED={seed} python -m pytest tests/test_faults.py -k {what}]"


# ------------------------------------------------------------------ writer

def digest(data: bytes | bytearray) -> str:
    return xxhash.xxh3_128_hexdigest(data)


class Writer(threading.Thread):
    """Steady O_DIRECT writes to the disks of GROUP through the mount, one
    request each (4 KiB-aligned, at most 128 KiB), with the group's state
    (one hash per disk) recorded after each: the possible points. A failed
    write (the mount was killed) records the state it would have made as a
    possible point too, waits for the mount to be back and reads the source
    again: a write that failed may or may not be in."""

    def __init__(self, site: Site, seed: int, interval: float = 0.002, zero_fraction: float = 0.15) -> None:
        super().__init__(daemon=True)
        self.site = site
        self.rng = random.Random(seed)
        self.interval = interval
        self.zero_fraction = zero_fraction
        self.model = {name: bytearray() for name in DISKS}
        self.hashes: dict[str, str] = {}
        self.states: set[tuple[str, ...]] = set()
        self.lock = threading.Lock()
        self.mount_up = threading.Event()
        self.mount_up.set()
        self.stop_flag = threading.Event()
        self._pause = threading.Event()
        self._idle = threading.Event()
        self.error: BaseException | None = None
        self.failed_writes = 0
        self.buf = mmap.mmap(-1, 128 * KiB)
        self.fds: dict[str, int] = {}

    # state ------------------------------------------------------------
    def state(self) -> tuple[str, ...]:
        return tuple(self.hashes[n] for n in DISKS)

    def record(self) -> None:
        with self.lock:
            self.states.add(self.state())
        STATS["states"] += 1

    def resync(self) -> None:
        """The model is what the source holds (read from the backing files)."""
        for name in DISKS:
            self.model[name] = bytearray((self.site.src / GROUP / name).read_bytes())
            self.hashes[name] = digest(self.model[name])
        self.record()

    def create(self) -> None:
        """The disks, written whole with VM-like content (no holes: they stay allocated)."""
        os.makedirs(self.site.mnt / GROUP, exist_ok=True)
        for name, size in DISKS.items():
            data = bytearray()
            while len(data) < size:
                n = min(size - len(data), self.rng.randrange(1, 17) * 64 * KiB)
                data += os.urandom(n) if self.rng.random() < 0.6 else bytes([self.rng.randrange(1, 256)]) * n
            with open(self.site.mnt / GROUP / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        self.resync()

    # control ------------------------------------------------------------
    def pause(self, timeout: float = 30) -> None:
        self._idle.clear()
        self._pause.set()
        if self.is_alive() and not self._idle.wait(timeout):
            raise AssertionError("the writer does not pause (a write hangs?)")
        self._close()

    def resume(self) -> None:
        self._pause.clear()

    def finish(self) -> None:
        self.stop_flag.set()
        self._pause.clear()
        self.join(30)
        self._close()
        if self.error is not None:
            raise AssertionError(f"writer failed: {self.error!r}") from self.error

    def _close(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()

    def _fd(self, name: str) -> int:
        if name not in self.fds:
            self.fds[name] = os.open(self.site.mnt / GROUP / name, os.O_RDWR | os.O_DIRECT)
        return self.fds[name]

    # the loop -----------------------------------------------------------
    def run(self) -> None:
        try:
            while not self.stop_flag.is_set():
                if self._pause.is_set():
                    self._idle.set()
                    time.sleep(0.01)
                    continue
                self.step()
                time.sleep(self.interval)
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc
        finally:
            self._idle.set()

    def step(self) -> None:
        name = self.rng.choice(list(DISKS))
        size = DISKS[name]
        length = self.rng.randrange(1, 33) * 4 * KiB
        offset = self.rng.randrange(0, (size - length) // (4 * KiB) + 1) * 4 * KiB
        chunk = bytes(length) if self.rng.random() < self.zero_fraction else os.urandom(length)
        self.buf[:length] = chunk
        after = bytearray(self.model[name])
        after[offset:offset + length] = chunk
        try:
            done = os.pwrite(self._fd(name), memoryview(self.buf)[:length], offset)
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED, errno.ENOENT) \
                    or self.mount_up.is_set() and is_mounted(self.site.mnt) and not self._mount_dead():
                raise
            self._failed(name, after)
            return
        if done != length:
            raise AssertionError(f"short write {done} of {length} at {offset} of {name}")
        self.model[name] = after
        self.hashes[name] = digest(after)
        self.record()
        STATS["writes"] += 1
        STATS["bytes_written"] += length

    def _mount_dead(self) -> bool:
        proc = self.site.mount.proc
        return proc is None or proc.poll() is not None

    def _failed(self, name: str, after: bytearray) -> None:
        self.failed_writes += 1
        with self.lock:
            maybe = dict(self.hashes)
            maybe[name] = digest(after)
            self.states.add(tuple(maybe[n] for n in DISKS))
        self._close()
        if not self.mount_up.wait(60):
            raise AssertionError("the mount did not come back")
        self.resync()

    def possible(self, state: tuple[str, ...]) -> bool:
        with self.lock:
            return state in self.states


# ---------------------------------------------------------------- checks

def replica_state(site: Site) -> tuple[str, ...] | None:
    out = []
    for name, size in DISKS.items():
        try:
            data = site.replica(f"{GROUP}/{name}").read_bytes()
        except FileNotFoundError:
            return None
        if len(data) != size:
            return None
        out.append(digest(data))
    return tuple(out)


def store_pending(site: Site) -> bool:
    return any(d["state"] == "incomplete" for d in store_status(site.store_url) if d["source"] == NAME)


def check_at_point(site: Site, writer: Writer, frozen: bool, seed: int, what: str, timeout: float = 15) -> bool:
    """The replica of GROUP equals a state the source held. frozen: the
    receiver is dead, so the store does not change; a committed cycle not yet
    applied (redone at the next start) defers the check. Otherwise nothing
    new arrives (the mount is dead or cut off) and the replica must settle at
    a point. Returns whether it was checked."""
    deadline = time.monotonic() + timeout
    while True:
        pending = store_pending(site)
        if pending and frozen:
            CHECKS["at-point deferred (apply pending)"] += 1
            return False
        if not pending:
            got = replica_state(site)
            if got is not None and writer.possible(got):
                CHECKS["replica at a point"] += 1
                CHECKS["bytes compared"] += sum(DISKS.values())
                return True
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: the replica of {GROUP} is at no point the source held "
                                 f"(pending {pending}, {len(writer.states)} states) {where(seed, what)}\n"
                                 f"store status {json.dumps(store_status(site.store_url), indent=1)}\n"
                                 f"mount log:\n{site.mount.log()[-3000:]}\nserve log:\n{site.server.log()[-3000:]}")
        time.sleep(0.05)


def full_syncs(site: Site) -> int:
    """Full syncs (hash comparisons) the mount's log records, over all its runs."""
    return sum(1 for line in site.mount.log().splitlines() if FULL_SYNC_LINE.search(line))


def check_no_full_sync(site: Site, baseline: int, seed: int, what: str) -> None:
    CHECKS["no full sync"] += 1
    now = full_syncs(site)
    assert now == baseline, (f"{what}: {now - baseline} full sync(s) without lost tracking state {where(seed, what)}\n"
                             + "\n".join(x for x in site.mount.log().splitlines() if "full sync" in x)[-3000:])


def check_converged(site: Site, writer: Writer, what: str, seed: int, timeout: float = 60) -> None:
    """Writes paused: status in sync and the replicas byte-identical to the
    source (Site.converged compares bytes), and the source holds exactly
    what the writer wrote (nothing lost)."""
    writer.pause()
    site.wait_converged(f"{what} {where(seed, what)}", timeout=timeout)
    CHECKS["converged, byte-identical"] += 1
    src = tree(site.src)
    CHECKS["bytes compared"] += 2 * sum(int(v.split(":")[0]) for v in src.values())
    for name in DISKS:
        got = (site.src / GROUP / name).read_bytes()
        assert digest(got) == writer.hashes[name], f"{what}: the source lost writes to {name} {where(seed, what)}"
        CHECKS["source holds every write"] += 1
        CHECKS["bytes compared"] += len(got)
    assert writer.possible(replica_state(site)), what
    writer.resume()


def status_shows(site: Site, pred, what: str, seed: int, timeout: float = 20) -> dict:
    """Until `vrfs status` of the mount satisfies pred (a reason for the fault)."""
    deadline = time.monotonic() + timeout
    st: dict = {}
    while time.monotonic() < deadline:
        try:
            st = mount_status(str(site.mnt))
        except UserError:
            st = {}
        if st and pred(st):
            CHECKS["fault visible in status"] += 1
            return st
        time.sleep(0.1)
    raise AssertionError(f"{what}: status never showed the fault {where(seed, what)}: {json.dumps(st, indent=1)}")


def wait_checkpoint(site: Site, timeout: float = 60) -> None:
    """Until every disk's state file records an acknowledged point and no
    full sync (the checkpoint soon after the first acknowledgment): from then
    on a crash costs no full sync."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for name in DISKS:
            ino = os.stat(site.src / GROUP / name).st_ino
            try:
                states.append(DiskState.decode((site.src / ".vrfs" / "state" / f"{ino}.psf").read_bytes()))
            except (OSError, CorruptStateFile):
                states.append(None)
        if all(s is not None and s.last_ack_cycle and not s.needs_full_sync for s in states):
            return
        assert time.monotonic() < deadline, f"no checkpoint of the first acknowledgments: {states}"
        time.sleep(0.1)


def started_site(tmp_path: Path, mount_factory, stack, seed: int, rpo: str = "1s", store: Path | None = None,
                 setup=None) -> tuple[Site, Writer]:
    site = Site(tmp_path, mount_factory, stack, store=store)
    site.rpo = rpo
    if setup is not None:
        setup(site)
    site.serve().start_mount()
    writer = Writer(site, seed)
    writer.create()
    site.wait_converged("initial sync", timeout=60)
    wait_checkpoint(site)
    return site, writer


def loop_fs(tmp_path: Path, stack, name: str, size: int = 64 * MiB) -> Path:
    """A small ext4 in a file, mounted at tmp_path/name; unmounted and detached in cleanup."""
    image, mnt = tmp_path / f"{name}.img", tmp_path / name
    mnt.mkdir(exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    dev = losetup(image)
    stack.callback(losetup_detach, dev)
    run("mount", dev, str(mnt))

    def unmount() -> None:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    stack.callback(unmount)
    shutil.rmtree(mnt / "lost+found", ignore_errors=True)
    return mnt


def fill(path: Path) -> None:
    """A file that takes every free block of its file system (down to the last byte it can get)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        sv = os.statvfs(path)
        try:
            os.posix_fallocate(fd, 0, max(sv.f_bavail * sv.f_frsize - 256 * KiB, 4096))
        except OSError:
            pass
        os.lseek(fd, 0, os.SEEK_END)
        chunk = 64 * KiB
        while chunk >= 1:
            try:
                os.write(fd, b"\xff" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2
        os.fsync(fd)
    finally:
        os.close(fd)
    CHECKS["fs filled"] += 1


# ------------------------------------------------------------------ tests

def kill9_run(tmp_path, mount_factory, stack, kills: int) -> None:
    seed = SEED
    rng = random.Random(seed)
    print(f"seed {seed}: replay with VRFS_FAULT_SEED={seed}")
    site, writer = started_site(tmp_path, mount_factory, stack, seed)
    baseline = full_syncs(site)
    writer.start()
    try:
        for i in range(1, kills + 1):
            STATS["iterations"] += 1
            time.sleep(rng.uniform(0.05, 1.2))
            what = f"kill {i}"
            if rng.random() < 0.5:
                FAULTS["kill -9 mount"] += 1
                writer.mount_up.clear()
                site.mount.kill()
                assert not is_mounted(site.mnt)
                with pytest.raises(UserError):  # the fault shows: status cannot reach the daemon
                    mount_status(str(site.mnt))
                CHECKS["fault visible in status"] += 1
                check_at_point(site, writer, frozen=False, seed=seed, what=what)
                recovered = site.mount.log().count("recovered after an unclean shutdown")
                site.mount.start()
                writer.mount_up.set()
                # Every disk is recovered from its state file and activity log (no full sync: below).
                assert site.mount.log().count("recovered after an unclean shutdown") == recovered + len(DISKS), \
                    f"{what}: not recovered from the state files {where(seed, what)}"
                CHECKS["recovered after unclean shutdown (log)"] += 1
            else:
                FAULTS["kill -9 serve"] += 1
                site.server.kill9()
                check_at_point(site, writer, frozen=True, seed=seed, what=what)
                status_shows(site, lambda st: not st["connected"] and all(
                    d["state"] in ("disconnected", "full-sync") and d.get("error") for d in st["disks"]),
                    what, seed)
                site.server.start()
            check_no_full_sync(site, baseline, seed, what)
            if i % 10 == 0 or i == kills:
                check_converged(site, writer, what, seed)
    finally:
        writer.finish()
    check_converged(site, writer, "the end", seed)
    check_no_full_sync(site, baseline, seed, "the end")
    assert writer.failed_writes <= FAULTS["kill -9 mount"]


@pytest.mark.timeout(200)
def test_kill9_either_side(tmp_path, mount_factory, stack):
    kill9_run(tmp_path, mount_factory, stack, KILLS)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kill9_either_side_long(tmp_path, mount_factory, stack):
    kill9_run(tmp_path, mount_factory, stack, SLOW_KILLS)


# ------------------------------------------------------- network partition

def partition_run(tmp_path, mount_factory, stack, rounds: int, cut_seconds: tuple[float, float]) -> None:
    seed = SEED + 1
    rng = random.Random(seed)
    ns, link, _, theirs = netns(stack, "p", net=200)

    def in_netns(site: Site) -> None:
        site.server.netns, site.server.host = ns, theirs
        # A silent link fails after VRFS_LINK_TIMEOUT (vrfs/link.py); short here so a cut shows in seconds.
        site.mount_env = {"VRFS_LINK_TIMEOUT": "3"}
        site.server.env["VRFS_LINK_TIMEOUT"] = "3"
    site, writer = started_site(tmp_path, mount_factory, stack, seed, setup=in_netns)
    assert site.status() and mount_status(str(site.mnt))["peer"].startswith(theirs)
    baseline = full_syncs(site)
    writer.start()
    try:
        for i in range(1, rounds + 1):
            STATS["iterations"] += 1
            what = f"partition {i}"
            time.sleep(rng.uniform(0.2, 2.0))
            FAULTS["network partition"] += 1
            run("ip", "link", "set", link, "down")
            cut_at = time.monotonic()
            # Writes go on while the DR site is unreachable; status must say so.
            status_shows(site, lambda st: not st["connected"] and all(
                d["state"] != "in-sync" and d.get("error") for d in st["disks"]), what, seed,
                timeout=max(cut_seconds[1], 30))
            time.sleep(max(0.0, rng.uniform(*cut_seconds) - (time.monotonic() - cut_at)))
            check_at_point(site, writer, frozen=False, seed=seed, what=what)
            run("ip", "link", "set", link, "up")
            check_converged(site, writer, what, seed, timeout=90)
            check_no_full_sync(site, baseline, seed, what)
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], capture_output=True)
        writer.finish()
    check_converged(site, writer, "the end", seed)


@pytest.mark.timeout(150)
def test_network_partition(tmp_path, mount_factory, stack):
    partition_run(tmp_path, mount_factory, stack, rounds=1, cut_seconds=(5, 8))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_network_partition_long(tmp_path, mount_factory, stack):
    partition_run(tmp_path, mount_factory, stack, rounds=8, cut_seconds=(5, 40))


# ------------------------------------------------------------- store full

def store_full_run(tmp_path, mount_factory, stack, rounds: int) -> None:
    seed = SEED + 2
    rng = random.Random(seed)
    fs_root = loop_fs(tmp_path, stack, "storefs")
    site, writer = started_site(tmp_path, mount_factory, stack, seed, store=fs_root / "store")
    baseline = full_syncs(site)
    writer.start()
    try:
        for i in range(1, rounds + 1):
            STATS["iterations"] += 1
            what = f"store full {i}"
            time.sleep(rng.uniform(0.2, 1.5))
            FAULTS["store file system full"] += 1
            fill(fs_root / "filler")
            # The group's cycles are refused (staging needs space) or a commit
            # cannot apply: either way status says why, and the replica stays at a point.
            # (ENOSPC in the apply, or the staging reserve: "would leave less than N MiB free")
            status_shows(site, lambda st: any(d["state"] != "in-sync" and d.get("error")
                                              and ("space" in d["error"].lower() or "free" in d["error"])
                                              for d in st["disks"]), what, seed)
            writer.pause()
            # A commit whose apply ran out of space is redone once there is
            # room (the store shows it incomplete): the point is in the journal.
            check_at_point(site, writer, frozen=store_pending(site), seed=seed, what=what)
            writer.resume()
            time.sleep(rng.uniform(0.5, 2))
            os.unlink(fs_root / "filler")
            check_converged(site, writer, what, seed, timeout=90)
            check_no_full_sync(site, baseline, seed, what)
    finally:
        writer.finish()


@pytest.mark.timeout(150)
def test_store_full(tmp_path, mount_factory, stack):
    store_full_run(tmp_path, mount_factory, stack, rounds=1)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_store_full_long(tmp_path, mount_factory, stack):
    store_full_run(tmp_path, mount_factory, stack, rounds=6)


# ------------------------------------------------ source state directory full

def state_dir_full_run(tmp_path, mount_factory, stack, rounds: int) -> None:
    """SRC on a small file system; a filler in SRC/.vrfs (hidden from the
    datastore) takes every free block. The disks are allocated (written
    whole), so the VM's overwrites need no space: they must go on, while the
    activity log and the checkpoints cannot grow."""
    seed = SEED + 3
    rng = random.Random(seed)

    def on_loop(site: Site) -> None:
        site.src.rmdir()
        assert loop_fs(tmp_path, stack, "src") == site.src
    site, writer = started_site(tmp_path, mount_factory, stack, seed, setup=on_loop)
    writer.start()
    try:
        for i in range(1, rounds + 1):
            STATS["iterations"] += 1
            what = f"state dir full {i}"
            time.sleep(rng.uniform(0.2, 1.5))
            FAULTS["source state directory full"] += 1
            before = full_syncs(site)
            fill(site.src / ".vrfs" / "filler")
            # A new, empty disk needs no space; its first acknowledgment asks
            # for a checkpoint at once (instead of within 30 s).
            (site.mnt / GROUP / f"nvram{i}").touch()
            # Writes go on (the writer fails the test otherwise); tracking is
            # not durable: a warning, or needs-full-sync with the reason.
            st = status_shows(site, lambda st: bool(st["tracking_degraded"]) and all(
                d.get("warning") or d.get("reason") for d in st["disks"]), what, seed, timeout=60)
            lost = any(d["state"] == "full-sync" or "full sync" in d.get("reason", "") for d in st["disks"])
            time.sleep(rng.uniform(0.5, 2))
            os.unlink(site.src / ".vrfs" / "filler")
            check_converged(site, writer, what, seed, timeout=90)
            status_shows(site, lambda st: not st["tracking_degraded"], f"{what}: durable again", seed, timeout=60)
            # A full sync only where tracking state was lost (the state files go on ENOSPC).
            CHECKS["no full sync"] += 1
            if not lost and "cannot be made durable" not in site.mount.log():
                assert full_syncs(site) == before, f"{what}: a full sync without lost tracking {where(seed, what)}"
    finally:
        writer.finish()
    check_converged(site, writer, "the end", seed)


@pytest.mark.timeout(150)
def test_state_dir_full(tmp_path, mount_factory, stack):
    state_dir_full_run(tmp_path, mount_factory, stack, rounds=1)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_state_dir_full_long(tmp_path, mount_factory, stack):
    state_dir_full_run(tmp_path, mount_factory, stack, rounds=5)


# ------------------------------------------- state files lost while unmounted

def damage_state_file(path: Path, how: str, rng: random.Random) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        os.truncate(path, rng.randrange(0, path.stat().st_size))
    else:
        data = bytearray(path.read_bytes())
        off = rng.randrange(0, len(data))
        data[off:off + 16] = bytes(b ^ 0xA5 for b in data[off:off + 16])
        path.write_bytes(bytes(data))


def state_file_run(tmp_path, mount_factory, stack, rounds: int) -> None:
    """While unmounted (cleanly, or after a kill -9), a disk's state file is
    deleted, cut short or overwritten; after the remount that disk (only)
    does a full sync, with the reason in status, and converges byte-identically.
    While mounted, a deleted state file is written again by the next
    checkpoint: no full sync at all."""
    seed = SEED + 4
    rng = random.Random(seed)
    site, writer = started_site(tmp_path, mount_factory, stack, seed)
    writer.start()
    try:
        for i in range(1, rounds + 1):
            STATS["iterations"] += 1
            victim = rng.choice(list(DISKS))
            how = rng.choice(["delete", "truncate", "garbage"])
            what = f"state file {how} {i}"
            time.sleep(rng.uniform(0.2, 1.0))
            ino = os.stat(site.src / GROUP / victim).st_ino
            state_file = site.src / ".vrfs" / "state" / f"{ino}.psf"
            crash = rng.random() < 0.5
            FAULTS[f"state file {how} while unmounted ({'kill -9' if crash else 'umount'})"] += 1
            before = full_syncs(site)
            writer.pause()
            if crash:
                writer.mount_up.clear()
                site.mount.kill()
            else:
                site.mount.umount()
            damage_state_file(state_file, how, rng)
            site.mount.start()
            writer.mount_up.set()
            writer.resync()
            writer.resume()
            st = status_shows(site, lambda st: True, what, seed)
            log = site.mount.log()
            assert f"{GROUP}/{victim}: needs full sync" in log, f"{what}: the lost state is not reported"
            CHECKS["fault visible in status"] += 1  # the reason is in status while the full sync runs
            d = {x["path"]: x for x in st["disks"]}[f"{GROUP}/{victim}"]
            assert d["state"] in ("full-sync", "syncing", "in-sync"), d
            check_converged(site, writer, what, seed, timeout=90)
            CHECKS["full sync only where state was lost"] += 1
            synced = [line for line in site.mount.log().splitlines()[len(log.splitlines()) - 200:]
                      if FULL_SYNC_LINE.search(line)]
            assert full_syncs(site) > before, f"{what}: no full sync after lost state {where(seed, what)}"
            assert all(victim in line for line in synced[-(full_syncs(site) - before):]), synced
        # Deleted while mounted: the next checkpoint writes it again.
        STATS["iterations"] += 1
        FAULTS["state file deleted while mounted"] += 1
        before = full_syncs(site)
        for name in DISKS:
            (site.src / ".vrfs" / "state" / f"{os.stat(site.src / GROUP / name).st_ino}.psf").unlink()
        writer.pause()
        site.mount.umount()
        site.mount.start()
        writer.resync()
        writer.resume()
        check_converged(site, writer, "state deleted while mounted", seed)
        check_no_full_sync(site, before, seed, "state deleted while mounted")
    finally:
        writer.finish()


@pytest.mark.timeout(150)
def test_state_file_lost(tmp_path, mount_factory, stack):
    state_file_run(tmp_path, mount_factory, stack, rounds=3)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_state_file_lost_long(tmp_path, mount_factory, stack):
    state_file_run(tmp_path, mount_factory, stack, rounds=20)


# ---------------------------------------------- replicas damaged at the DR site

def replica_damage_run(tmp_path, mount_factory, stack, rounds: int) -> None:
    """A replica deleted or overwritten by hand: a deleted one shows in
    `status --store` (damaged) and is rebuilt (the receiver asks for a full
    sync of it); an overwritten one is found by `vrfs verify` and repaired;
    both end byte-identical."""
    seed = SEED + 5
    rng = random.Random(seed)
    site, writer = started_site(tmp_path, mount_factory, stack, seed)
    writer.start()
    try:
        for i in range(1, rounds + 1):
            STATS["iterations"] += 1
            victim = rng.choice(list(DISKS))
            replica = site.replica(f"{GROUP}/{victim}")
            time.sleep(rng.uniform(0.2, 1.0))
            if rng.random() < 0.5:
                what = f"replica deleted {i}"
                FAULTS["replica deleted at the DR site"] += 1
                writer.pause()  # no cycle may recreate it before status is read
                site.server.stop()
                replica.unlink()
                st = {d["path"]: d for d in store_status(site.store_url)}
                assert st[f"{GROUP}/{victim}"]["state"] == "damaged", st
                CHECKS["fault visible in status"] += 1
                site.server.start()
                writer.resume()
                check_converged(site, writer, what, seed, timeout=90)
            else:
                what = f"replica overwritten {i}"
                FAULTS["replica overwritten at the DR site"] += 1
                writer.pause()
                site.wait_converged(what, timeout=60)
                with open(replica, "r+b") as f:
                    off = rng.randrange(0, DISKS[victim] - 4096)
                    f.seek(off)
                    f.write(os.urandom(4096))
                    f.flush()
                    os.fsync(f.fileno())
                found = vrfs("verify", str(site.mnt), "--json", "--rate", "0", check=False, timeout=120)
                assert found.returncode == 1, (found.stdout, found.stderr)
                CHECKS["fault found by verify"] += 1
                status_shows(site, lambda st: any((d.get("verify") or {}).get("state") not in (None, "ok")
                                                  for d in st["disks"]), what, seed)
                # Repaired with the writes still paused: a write would carry the block anyway.
                fixed = vrfs("verify", str(site.mnt), "--repair", "--rate", "0", check=False, timeout=120)
                assert fixed.returncode == 1, (fixed.stdout, fixed.stderr)
                writer.resume()
                check_converged(site, writer, what, seed, timeout=90)
                writer.pause()
                again = vrfs("verify", str(site.mnt), "--rate", "0", check=False, timeout=120)
                assert again.returncode == 0, (again.stdout, again.stderr)
                CHECKS["verify clean after repair"] += 1
                writer.resume()
    finally:
        writer.finish()


@pytest.mark.timeout(150)
def test_replica_damaged(tmp_path, mount_factory, stack):
    replica_damage_run(tmp_path, mount_factory, stack, rounds=3)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_replica_damaged_long(tmp_path, mount_factory, stack):
    replica_damage_run(tmp_path, mount_factory, stack, rounds=20)


@pytest.mark.timeout(10)
def test_silent_link_fails_within_link_timeout():
    """Regression (found by test_network_partition): a partitioned link kept
    the shipper waiting up to REPLY_TIMEOUT (600 s) with status `syncing`
    and no reason. The socket now aborts after VRFS_LINK_TIMEOUT."""
    import socket

    from vrfs.sockets import LINK_TIMEOUT, tune_socket
    with socket.socket() as sock:
        tune_socket(sock, None)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == int(LINK_TIMEOUT * 1000)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) * 1.0 <= LINK_TIMEOUT
