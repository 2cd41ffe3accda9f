"""Recovery as an unlucky operator or a hostile local user would do it, on a
real `vrfs serve` (cycles sent over TLS by the test as the source hv1, whose
content at every cut it records), real `vrfs mount`s, tmpfs targets and loop
devices: the commands in the wrong order, at once, killed half way (the
VRFS_TEST_CRASH points), with and without the server, into odd places and
full file systems. Every image is compared byte for byte with what the
source held at its point's cut; no mistake may cost a retained point or a
replica, or leave a group fenced with no way to finish, and each gets one
line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from mounthelpers import vrfs
from servehelpers import REPO, Server, aiter_blocks, connect, disk, vrfs_command, vrfs_env
from vrfs.cycle import CycleHeader, DiskEntry
from vrfs.link import CycleRefused, LinkError

pytestmark = [pytest.mark.timeout(60)]

BS = 64 << 10
SIZE = 16 * BS  # 1 MiB: a test failover wraps it in a qcow2 overlay
GROUP = "hv1/vm1"


class Source:
    """What the source held at each point: a model of one disk, shipped as cycles."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.disk: DiskEntry = disk(1, "vm1/disk0.raw", SIZE)
        self.content = bytearray(SIZE)
        self.at: dict[int, bytes] = {}
        self.next_id = 1
        self.epoch = time.time() - 600  # cuts 2 s apart: each in a slot of its own under --retain 1h:1s

    async def cycle(self, blocks: dict[int, int]) -> int:
        """One cycle that fills each block index with its byte value; returns the
        point's id. Refused as busy (a test failover holds the group), it is
        sent again, as a source does."""
        import trio
        cycle_id = self.next_id
        content = bytearray(self.content)
        records = []
        for index, value in sorted(blocks.items()):
            data = bytes([value]) * BS
            content[index * BS:(index + 1) * BS] = data
            records.append((0, index, data))
        header = CycleHeader(group="vm1", cycle_id=cycle_id, cut_time=self.epoch + 2 * cycle_id, disks=(self.disk,),
                             full_sync={self.disk.disk_id: None} if cycle_id == 1 else {})
        link = await connect(self.server)
        try:
            while True:
                try:
                    await link.send_cycle(header, aiter_blocks(records))
                    break
                except CycleRefused as exc:
                    if "busy" not in str(exc):
                        raise
                    await trio.sleep(0.05)
        finally:
            await link.aclose()
        self.content = content
        self.at[cycle_id] = bytes(content)
        self.next_id += 1
        return cycle_id


def vrfs_fails(*args: str, expect: str) -> str:
    result = vrfs(*args, check=False)
    assert result.returncode != 0, (args, result.stdout)
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, (args, result.stderr)
    assert expect in result.stderr, (args, result.stderr)
    return result.stderr


def image(path: Path) -> bytes:
    return path.read_bytes()


def points(store_url: str) -> list[int]:
    return [p["id"] for p in json.loads(vrfs("points", "--store", store_url, "--json").stdout)]


async def test_a_command_without_the_server_keeps_the_retained_points_when_it_finishes_a_committed_cycle(
        tmp_path: Path) -> None:
    """`vrfs serve --retain` killed between a cycle's commit and its apply; then
    a test failover of an older point without the server. The command applies
    the committed cycle first, and must neither drop the retained points (it
    does not know the server's policy) nor forget the point the replica was at."""
    store_url = f"dir:{tmp_path / 'store'}"
    server = Server(store_url, tmp_path / "serve.log")
    server.args = ("--retain", "1h:1s")
    try:
        server.start()
        source = Source(server)
        first = await source.cycle({0: 1, 1: 1, 2: 1, 3: 1})
        second = await source.cycle({1: 2})
        third = await source.cycle({2: 3})
        assert points(store_url) == [first, second, third]
        server.stop()
        server.env = {"VRFS_TEST_CRASH": "committed"}
        server.start()
        with pytest.raises(LinkError):
            await source.cycle({3: 4})
        server.wait()
        fourth = source.next_id  # committed, not applied
        source.at[fourth] = source.at[third][:3 * BS] + bytes([4]) * BS + source.at[third][4 * BS:]
    finally:
        server.stop()

    for point in (first, second, third, fourth):
        to = tmp_path / f"test-{point}"
        vrfs("test-failover", "--store", store_url, GROUP, "--point", str(point), "--to", str(to),
             "--format", "raw")
        assert image(to / "vm1/disk0.raw") == source.at[point], point
        vrfs("test-failover", "--cleanup", str(to))
    assert points(store_url) == [first, second, third, fourth]


def vrfs_killed_at(hook: str, *args: str) -> None:
    """Run a vrfs command that kills itself (SIGKILL) at the crash point ``hook``."""
    result = subprocess.run(vrfs_command(*args), capture_output=True, text=True, cwd=REPO, timeout=60,
                            env=vrfs_env({"VRFS_TEST_CRASH": hook}))
    assert result.returncode == -9, (args, result.returncode, result.stderr)


async def test_an_interrupted_failover_to_an_older_point_survives_pruning(tmp_path: Path) -> None:
    """A failover to an older point is killed right after it fenced the group;
    `vrfs serve` then restarts with a policy that no longer keeps that point
    (or simply later: `--retain 20s:2s`). The fence names the point, so the
    point is kept, and the same command finishes the failover with its bytes."""
    store_url = f"dir:{tmp_path / 'store'}"
    server = Server(store_url, tmp_path / "serve.log")
    server.args = ("--retain", "1h:1s")
    target = tmp_path / "dr"
    try:
        server.start()
        source = Source(server)
        first = await source.cycle({0: 1, 1: 1, 2: 1, 3: 1})
        second = await source.cycle({1: 2})
        third = await source.cycle({1: 3, 2: 3})
        server.stop()
        vrfs_killed_at("failover-fenced", "failover", "--store", store_url, GROUP, "--point", str(second),
                       "--to", str(target))
        server.args = ("--retain", "5m:1s")  # the cuts were 10 minutes ago
        server.start()
        assert points(store_url) == [second, third]
        out = vrfs("failover", "--store", store_url, GROUP, "--point", str(second), "--to", str(target)).stdout
        assert f"point {second}" in out, out
        assert image(target / "vm1/disk0.raw") == source.at[second]
        vrfs_fails("failover", "--store", store_url, GROUP, "--to", str(target), expect="already failed over")
        assert first not in points(store_url)
    finally:
        server.stop()


@pytest.fixture
def tmpfs(tmp_path: Path, stack):
    """tmpfs(SIZE): a tmpfs of that size (another file system than the store's), unmounted at the end."""
    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs-{size}"
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
        stack.callback(unmount, where)
        return where

    def unmount(where: Path) -> None:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
    return mount


def grow(tmpfs: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(tmpfs)], check=True)


def exists(path: Path) -> bool:
    return os.path.lexists(path)


def qemu_img_compare(a: Path, b: Path) -> None:
    subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)], check=True, timeout=60)


async def test_images_on_another_file_system_are_the_point(tmp_path: Path, tmpfs) -> None:
    """Test failover (raw and qcow2) and failover into a tmpfs, with the store
    on another file system: the kernel cannot copy between them (EXDEV)."""
    store_url = f"dir:{tmp_path / 'store'}"
    server = Server(store_url, tmp_path / "serve.log")
    elsewhere = tmpfs("16m")
    try:
        server.start()
        source = Source(server)
        first = await source.cycle({i: 1 + i for i in range(0, 16, 3)})
        for fmt in ("raw", "qcow2"):
            to = elsewhere / fmt
            vrfs("test-failover", "--store", store_url, GROUP, "--to", str(to), "--format", fmt)
            expected = tmp_path / "expected.raw"
            expected.write_bytes(source.at[first])
            qemu_img_compare(to / "vm1/disk0.raw", expected)
            vrfs("test-failover", "--cleanup", str(to))
        out = vrfs("failover", "--store", store_url, GROUP, "--to", str(elsewhere / "dr")).stdout
        assert f"point {first}" in out, out
        assert image(elsewhere / "dr/vm1/disk0.raw") == source.at[first]
    finally:
        server.stop()


async def test_a_full_target_file_system_gets_one_line_and_changes_nothing(tmp_path: Path, tmpfs) -> None:
    """The target too small for the images: one line naming the cause, nothing
    left behind that blocks the next try, the store unchanged and serving."""
    store_url = f"dir:{tmp_path / 'store'}"
    server = Server(store_url, tmp_path / "serve.log")
    small = tmpfs("512k")
    try:
        server.start()
        source = Source(server)
        first = await source.cycle({i: 1 + i for i in range(16)})
        for running in (True, False):
            for fmt in ("raw", "qcow2"):
                to = small / "test"
                vrfs_fails("test-failover", "--store", store_url, GROUP, "--to", str(to), "--format", fmt,
                           expect="No space left")
                assert not to.exists()
            if running:
                server.stop()
        assert points(store_url) == [first]
        server.start()
        second = await source.cycle({1: 99})
        to = tmp_path / "test"
        vrfs("test-failover", "--store", store_url, GROUP, "--to", str(to), "--format", "raw")
        assert image(to / "vm1/disk0.raw") == source.at[second]
    finally:
        server.stop()


async def test_a_failover_stopped_by_a_full_target_says_so_and_finishes_later(tmp_path: Path, tmpfs) -> None:
    store_url = f"dir:{tmp_path / 'store'}"
    server = Server(store_url, tmp_path / "serve.log")
    small = tmpfs("512k")
    to = small / "dr"
    try:
        server.start()
        source = Source(server)
        first = await source.cycle({i: 1 + i for i in range(16)})
        vrfs_fails("failover", "--store", store_url, GROUP, "--to", str(to), expect="run the same command again")
        assert not list(to.rglob("*.tmp"))  # the space of a partial copy is given back
        vrfs_fails("failover", "--store", store_url, GROUP, "--to", str(tmp_path / "elsewhere"),
                   expect="run the same command again")
        grow(small, "4m")
        vrfs("failover", "--store", store_url, GROUP, "--to", str(to))
        assert image(to / "vm1/disk0.raw") == source.at[first]
    finally:
        server.stop()


async def test_a_failover_that_cannot_finish_does_not_fence(tmp_path: Path) -> None:
    """Two disks of one group with different block sizes (the datastore's
    block size changed between them) cannot become one datastore: refused
    before the group is fenced, so replication goes on."""
    store_url = f"dir:{tmp_path / 'store'}"
    server = Server(store_url, tmp_path / "serve.log")
    try:
        server.start()
        link = await connect(server)
        a, b = disk(1, "vm1/a.raw", BS), disk(2, "vm1/b.raw", 4096, block_size=4096)
        header = CycleHeader(group="vm1", cycle_id=1, cut_time=time.time(), disks=(a, b),
                             full_sync={a.disk_id: None, b.disk_id: None})
        await link.send_cycle(header, aiter_blocks([(0, 0, b"a" * BS), (1, 0, b"b" * 4096)]))
        vrfs_fails("failover", "--store", store_url, GROUP, "--to", str(tmp_path / "dr"),
                   expect="different block sizes")
        (pt,) = json.loads(vrfs("points", "--store", store_url, "--json").stdout)
        assert pt["fenced"] is None
        header = CycleHeader(group="vm1", cycle_id=2, cut_time=time.time(), disks=(a, b))
        await link.send_cycle(header, aiter_blocks([(0, 0, b"A" * BS)]))
        await link.aclose()
    finally:
        server.stop()


async def test_targets_inside_the_store_or_that_cannot_be_made_are_refused_before_anything(tmp_path: Path) -> None:
    """--to inside the store's directory (where a source's next group, a
    journal's discard or a reprotect's cleanup would replace or delete the
    images), a dangling symbolic link, a path under a file: one line, with the
    server running and without it, and the group is not fenced."""
    store = tmp_path / "store"
    store_url = f"dir:{store}"
    server = Server(store_url, tmp_path / "serve.log")
    (tmp_path / "a-file").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    (tmp_path / "theirs").mkdir()
    os.chown(tmp_path / "theirs", 65534, 65534)  # another user's directory: they could plant links
    (tmp_path / "shared").mkdir()
    os.chmod(tmp_path / "shared", 0o1777)
    try:
        server.start()
        source = Source(server)
        first = await source.cycle({i: 1 + i for i in range(16)})
        targets = [(store / "hv1" / "x", "inside the store"),
                   (store / ".vrfs" / "journal" / "hv1" / "vm1", "inside the store"),
                   (store / ".vrfs" / "points" / "hv1" / "vm1" / "0", "inside the store"),
                   (tmp_path / "dangling", "symbolic link"),
                   (tmp_path / "a-file" / "dr", "cannot create"),
                   (tmp_path / "theirs", "can be written by others"),
                   (tmp_path / "shared", "can be written by others")]
        for running in (True, False):
            # Each target once with each command, half of them with the server, half without.
            for n, (to, expect) in enumerate(targets):
                command = ("test-failover", "failover")[(n + running) % 2]
                vrfs_fails(command, "--store", store_url, GROUP, "--to", str(to), expect=expect)
                assert not exists(to) or to.name in ("dangling", "theirs", "shared")
            vrfs_fails("reprotect", "--datastore", str(store), "--store", store_url, expect="the store's own")
            (pt,) = json.loads(vrfs("points", "--store", store_url, "--json").stdout)
            assert pt["id"] == first and pt["fenced"] is None
            if running:
                server.stop()
        server.start()
        second = await source.cycle({3: 33})
        vrfs("failover", "--store", store_url, GROUP, "--to", str(tmp_path / "dr"))
        assert image(tmp_path / "dr/vm1/disk0.raw") == source.at[second]
    finally:
        server.stop()


@pytest.mark.parametrize("killed,kind", [("vrfs serve", "dir"), ("vrfs failover", "dir"), ("vrfs failover", "dev")])
async def test_a_failover_killed_half_way_is_finished_by_the_same_command(tmp_path: Path, stack, killed: str,
                                                                         kind: str) -> None:
    """kill -9 of `vrfs serve` while it does a failover for the control socket,
    or of the command itself, after the first of two disks moved (renamed on
    a dir: store, copied from loop devices on a dev: store): the command says
    so in one line, and run again (the server restarted, or not) it finishes
    with both images at the point and the store fenced."""
    if kind == "dev":
        from servehelpers import losetup, losetup_detach
        devices = []
        for name in ("a", "b"):
            backing = tmp_path / f"backing-{name}"
            backing.write_bytes(bytes(1 << 20))
            devices.append(losetup(backing))
            stack.callback(losetup_detach, devices[-1])
        mapfile = tmp_path / "devices.map"
        mapfile.write_text(f"hv1/vm1/a.raw {devices[0]}\nhv1/vm1/b.raw {devices[1]}\n")
        store_url = f"dev:{mapfile}"
    else:
        store_url = f"dir:{tmp_path / 'store'}"
    server = Server(store_url, tmp_path / "serve.log")
    target = tmp_path / "dr"
    try:
        server.start()
        link = await connect(server)
        a, b = disk(1, "vm1/a.raw", 4 * BS), disk(2, "vm1/b.raw", 2 * BS)
        header = CycleHeader(group="vm1", cycle_id=1, cut_time=time.time(), disks=(a, b),
                             full_sync={a.disk_id: None, b.disk_id: None})
        await link.send_cycle(header, aiter_blocks([(0, i, bytes([i + 1]) * BS) for i in range(4)]
                                                   + [(1, 1, b"b" * BS)]))
        await link.aclose()
        expected = {"vm1/a.raw": b"".join(bytes([i + 1]) * BS for i in range(4)),
                    "vm1/b.raw": bytes(BS) + b"b" * BS}
        if killed == "vrfs serve":
            server.stop()
            server.env = {"VRFS_TEST_CRASH": "failover-moved"}
            server.start()
            vrfs_fails("failover", "--store", store_url, GROUP, "--to", str(target), expect="ended before it answered")
            server.wait()
            server.env = {}
            server.start()
        else:
            server.stop()
            vrfs_killed_at("failover-moved", "failover", "--store", store_url, GROUP, "--to", str(target))
        assert sum(exists(target / p) for p in expected) == 1
        (pt,) = json.loads(vrfs("points", "--store", store_url, "--json").stdout)
        assert pt["fenced"] and not pt["fenced"].get("done")
        out = vrfs("failover", "--store", store_url, GROUP, "--to", str(target)).stdout
        assert "point 1" in out, out
        for path, content in expected.items():
            assert image(target / path) == content, path
        lineage = json.loads((target / ".vrfs/lineage.json").read_text())
        assert {v["path"] for v in lineage.values()} == set(expected)
        vrfs_fails("failover", "--store", store_url, GROUP, "--to", str(target), expect="already failed over")
    finally:
        server.stop()


def vrfs_at_once(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Start the commands together; their results, in order."""
    procs = []
    try:
        for args in commands:
            procs.append(subprocess.Popen(vrfs_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, cwd=REPO, env=vrfs_env()))
        out = []
        for args, proc in zip(commands, procs, strict=True):
            stdout, stderr = proc.communicate(timeout=50)
            out.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
        return out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()  # by its PID
                proc.wait(10)


def hold_store_lock(store: Path) -> int:
    """Take the store's lock as a command working without a server does."""
    import fcntl
    fd = os.open(store / ".vrfs" / "lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


async def test_commands_and_a_server_at_once(tmp_path: Path) -> None:
    """Two test failovers of one group at once, through the server and
    without it; a command while another holds the store and the control file
    of a killed server is left; `vrfs serve` starting meanwhile."""
    store = tmp_path / "store"
    store_url = f"dir:{store}"
    server = Server(store_url, tmp_path / "serve.log")
    try:
        server.start()
        source = Source(server)
        first = await source.cycle({i: 1 + i for i in range(16)})
        for running in (True, False):
            a, b = tmp_path / f"a-{running}", tmp_path / f"b-{running}"
            results = vrfs_at_once(*[("test-failover", "--store", store_url, GROUP, "--to", str(d), "--format", "raw")
                                     for d in (a, b, a)])
            done = [r for r in results if r.returncode == 0]
            for r in results:
                assert r.returncode == 0 or (r.stderr.count("\n") == 1 and "Traceback" not in r.stderr), r.stderr
            assert len(done) >= (2 if running else 1), [r.stderr for r in results]
            if running:  # the same, with no process start between them: the second surely waits
                from concurrent.futures import ThreadPoolExecutor

                from vrfs import control
                socket_path = (store / ".vrfs" / "control").read_text().strip()
                requests = [{"op": "test-failover", "source": "hv1", "group": "vm1", "to": str(d), "point": None,
                             "format": "raw"} for d in (tmp_path / "c", tmp_path / "d")]
                with ThreadPoolExecutor(2) as pool:
                    answers = list(pool.map(control.ask, [socket_path] * 2, requests))
                assert all("lines" in x for x in answers), answers
            for d in (a, b, tmp_path / "c", tmp_path / "d"):
                if exists(d):
                    assert image(d / "vm1/disk0.raw") == source.at[first]
                    vrfs("test-failover", "--cleanup", str(d))
            if running:
                server.kill9()  # its control file stays behind
        fd = hold_store_lock(store)
        try:
            vrfs_fails("test-failover", "--store", store_url, GROUP, "--to", str(tmp_path / "c"),
                       expect="another vrfs command")
            with pytest.raises(RuntimeError, match="in use by another vrfs serve or vrfs command"):
                server.start()
        finally:
            os.close(fd)
        vrfs("test-failover", "--store", store_url, GROUP, "--to", str(tmp_path / "c"))
        assert not exists(store / ".vrfs" / "control")
        fd = hold_store_lock(store)
        try:
            vrfs_fails("failover", "--store", store_url, GROUP, "--to", str(tmp_path / "d"),
                       expect="another vrfs command")
        finally:
            os.close(fd)
    finally:
        server.stop()


async def test_test_failovers_of_older_points_while_cycles_arrive_and_pruning_runs(tmp_path: Path) -> None:
    """`--retain 20s:2s`, a cycle every 0.2 s (each applied, then pruning),
    and meanwhile test failovers of the oldest kept point, a middle one and
    the newest, raw and qcow2: each image is what the source held at that
    cut, or the command says in one line that the point was pruned."""
    import random

    import trio
    store_url = f"dir:{tmp_path / 'store'}"
    server = Server(store_url, tmp_path / "serve.log")
    server.args = ("--retain", "20s:2s")
    rng = random.Random(5)
    try:
        server.start()
        source = Source(server)
        source.epoch = time.time() - 30  # cuts 2 s apart, the older ones beyond the span
        await source.cycle({i: 1 + i for i in range(16)})
        for _ in range(10):
            await source.cycle({rng.randrange(16): rng.randrange(1, 256) for _ in range(3)})
        checked = 0
        stop = trio.Event()

        async def keep_sending() -> None:
            while not stop.is_set():
                source.epoch -= 1.9  # each cut 0.1 s after the one before, in real time
                await source.cycle({rng.randrange(16): rng.randrange(1, 256) for _ in range(3)})
                await trio.sleep(0.2)

        def test_failover(point: int, fmt: str, n: int) -> bool:
            to = tmp_path / f"t{n}"
            result = vrfs("test-failover", "--store", store_url, GROUP, "--point", str(point), "--to", str(to),
                          "--format", fmt, check=False)
            if result.returncode:
                assert "no point" in result.stderr and result.stderr.count("\n") == 1, result.stderr
                return False
            expected = tmp_path / f"expected{n}.raw"
            expected.write_bytes(source.at[point])
            qemu_img_compare(to / "vm1/disk0.raw", expected)
            vrfs("test-failover", "--cleanup", str(to))
            return True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_sending)
            for n in range(6):
                kept = await trio.to_thread.run_sync(points, store_url)
                point = [kept[0], kept[len(kept) // 2], kept[-1]][n % 3]
                checked += await trio.to_thread.run_sync(test_failover, point, ("raw", "qcow2")[n % 2], n)
            stop.set()
        assert checked >= 3
        assert len(points(store_url)) < source.next_id - 1  # pruning did run
    finally:
        server.stop()


@pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs FUSE")
def test_reprotect_refuses_a_served_datastore_and_finishes_after_a_kill(tmp_path: Path, mount_factory,
                                                                        tmpfs) -> None:
    """A real datastore of two disks, on a tmpfs (each seed is a copy across
    file systems): reprotect while `vrfs mount` serves it is refused; into a
    dev: store it is refused; killed after the first disk became a seed, the
    same command finishes, and every seed is the image."""
    src, mnt = tmpfs("16m") / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    m = mount_factory(src, mnt)
    (mnt / "vm1").mkdir()
    content = {"vm1/a.raw": os.urandom(3 * BS), "vm1/b.raw": os.urandom(2 * BS)}
    for path, data in content.items():
        (mnt / path).write_bytes(data)
    store_url = f"dir:{tmp_path / 'back'}"
    vrfs_fails("reprotect", "--datastore", str(src), "--store", store_url, expect="served by vrfs mount")
    m.umount()
    mapfile = tmp_path / "devices.map"
    mapfile.write_text("")
    vrfs_fails("reprotect", "--datastore", str(src), "--store", f"dev:{mapfile}", expect="needs a dir: store")
    vrfs_killed_at("reprotect-seeded", "reprotect", "--datastore", str(src), "--store", store_url)
    out = vrfs("reprotect", "--datastore", str(src), "--store", store_url).stdout
    seeds = tmp_path / "back/.vrfs/seeds"
    found = {}
    for info in seeds.glob("*.json"):
        found[json.loads(info.read_text())["path"]] = (seeds / info.name[:-len(".json")]).read_bytes()
    assert found == content, out
    assert not (src / "vm1").exists()
    vrfs_fails("reprotect", "--datastore", str(src), "--store", store_url, expect="holds no disk images")


def test_cleanup_of_a_killed_test_failover_and_of_what_is_not_one(tmp_path: Path) -> None:
    """A test failover killed after its first image: --cleanup removes it (the
    mark is written first), and the next test failover there is told to clean
    up. --cleanup refuses a file system mounted inside it (and keeps its
    files), a symbolic link, a second cleanup, `/`."""
    from vrfs.store.dirstore import DirStore
    from vrfs.store.base import GroupState
    store_dir = tmp_path / "store"
    store = DirStore(f"dir:{store_dir}", store_dir)
    store.open()
    try:  # two small disks of a group, as a cycle leaves them
        disks = (disk(1, "vm1/a.raw", BS), disk(2, "vm1/b.raw", BS))
        for d, fill in zip(disks, (b"a", b"b"), strict=True):
            store.replica("hv1", d.path).parent.mkdir(parents=True, exist_ok=True)
            store.replica("hv1", d.path).write_bytes(fill * BS)
        store.save_group("hv1", "vm1", GroupState(1, time.time(), disks))
    finally:
        store.close()
    store_url = f"dir:{store_dir}"
    to = tmp_path / "test"
    vrfs_killed_at("test-failover-image", "test-failover", "--store", store_url, GROUP, "--to", str(to))
    assert exists(to / "vm1/a.raw") and not exists(to / "vm1/b.raw")
    vrfs_fails("test-failover", "--store", store_url, GROUP, "--to", str(to), expect="--cleanup")
    os.symlink(to, tmp_path / "link")
    vrfs_fails("test-failover", "--cleanup", str(tmp_path / "link"), expect="symbolic link")
    inside = to / "vm1" / "look"
    inside.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(inside)], check=True)
    try:
        (inside / "precious").write_text("not the test failover's")
        vrfs_fails("test-failover", "--cleanup", str(to), expect="mount point")
        assert (inside / "precious").read_text() == "not the test failover's"
    finally:
        subprocess.run(["umount", str(inside)], check=True)
    assert "unfinished" in vrfs("test-failover", "--cleanup", str(to)).stdout
    assert not exists(to) and (store_dir / "hv1/vm1/a.raw").read_bytes() == b"a" * BS
    vrfs_fails("test-failover", "--cleanup", str(to), expect="not a test failover")
    vrfs_fails("test-failover", "--cleanup", "/", expect="not a test failover")
    vrfs("test-failover", "--store", store_url, GROUP, "--to", str(to))
    assert image(to / "vm1/b.raw") == b"b" * BS


@pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs FUSE")
async def test_a_datastore_still_served_by_vrfs_mount_is_no_target(tmp_path: Path, mount_factory) -> None:
    """Failback into the old datastore that the operator mounted again too
    early (`vrfs mount DIR` over itself, its disks gone with the reprotect):
    the images would be written through the mount, as new disks to
    replicate, and the datastore's .vrfs is out of reach there. Refused in
    one line, before the fence; so are a test failover into it and a reprotect."""
    store_url = f"dir:{tmp_path / 'store'}"
    server = Server(store_url, tmp_path / "serve.log")
    datastore = tmp_path / "datastore"
    datastore.mkdir()
    mount_factory(datastore, None)
    try:
        server.start()
        source = Source(server)
        await source.cycle({i: 1 + i for i in range(16)})
        server.stop()
        vrfs_fails("failover", "--store", store_url, GROUP, "--to", str(datastore), expect="vrfs mount serves")
        vrfs_fails("test-failover", "--store", store_url, GROUP, "--to", str(datastore / "test"),
                   expect="vrfs mount serves")
        vrfs_fails("reprotect", "--datastore", str(datastore), "--store", f"dir:{tmp_path / 'back'}",
                   expect="vrfs mount serves")
        (pt,) = json.loads(vrfs("points", "--store", store_url, "--json").stdout)
        assert pt["fenced"] is None
    finally:
        server.stop()


async def test_a_failover_while_a_cycle_is_in_flight_waits_for_it(tmp_path: Path) -> None:
    """A cycle is being received (its blocks trickle in) when the operator
    fails over through the server: the cycle finishes first, and the images
    are at its point, byte for byte; the next cycle is refused as fenced."""
    import trio
    store_url = f"dir:{tmp_path / 'store'}"
    server = Server(store_url, tmp_path / "serve.log")
    target = tmp_path / "dr"
    try:
        server.start()
        source = Source(server)
        await source.cycle({i: 1 + i for i in range(16)})
        expected = bytearray(source.content)

        async def slow_blocks():
            for index in (2, 9, 15):
                expected[index * BS:(index + 1) * BS] = b"s" * BS
                yield 0, index, b"s" * BS
                await trio.sleep(0.4)

        link = await connect(server)
        header = CycleHeader(group="vm1", cycle_id=2, cut_time=time.time(), disks=(source.disk,))
        out: list[str] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.send_cycle, header, slow_blocks())
            await trio.sleep(0.2)
            out.append(await trio.to_thread.run_sync(
                lambda: vrfs("failover", "--store", store_url, GROUP, "--to", str(target)).stdout))
        assert "point 2" in out[0], out
        assert image(target / "vm1/disk0.raw") == bytes(expected)
        header = CycleHeader(group="vm1", cycle_id=3, cut_time=time.time(), disks=(source.disk,))
        with pytest.raises(CycleRefused, match="fenced|failed over"):
            await link.send_cycle(header, aiter_blocks([(0, 0, b"x" * BS)]))
        await link.aclose()
    finally:
        server.stop()
