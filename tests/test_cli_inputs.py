"""Every command answers, every bad input gets one line and a non-zero exit."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import time

import pytest

from mounthelpers import is_mounted, vrfs
from servehelpers import REPO, vrfs_command, vrfs_env
from test_cli import fails

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def no_stray_mount(tmp_path):
    """A command that should have refused but mounted: unmount it and end its daemon (by the PID in
    its lock file), so a failing test leaves nothing behind."""
    yield
    for path in (tmp_path / "src", tmp_path / "mnt"):
        if not is_mounted(path):
            continue
        pid = None
        try:
            pid = int(os.getxattr(path, "user.vrfs.pid"))
        except (OSError, ValueError):
            pass
        if subprocess.run(["fusermount3", "-u", str(path)], capture_output=True).returncode:
            subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)
        if pid is not None:
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)


def test_usage_errors_carry_one_prefix():
    line = fails("mount", expect="the following arguments are required: SOURCE")
    assert line == "vrfs: mount: the following arguments are required: SOURCE (see --help)"
    line = fails("bogus", expect="invalid choice")
    assert line.startswith("vrfs: argument COMMAND: invalid choice"), line
    line = fails(expect="required: COMMAND")
    assert "vrfs: vrfs" not in line
    line = fails("status", "--nope", expect="unrecognized arguments: --nope")
    assert "vrfs: vrfs" not in line
    assert vrfs("status", "--nope", check=False).returncode == 2


@pytest.mark.parametrize("args, expect", [
    (("--peer", ""), "--peer"),
    (("--peer", "a b:1"), "not a host name"),
    (("--peer", "host\t:1"), "not a host name"),
    (("--peer", "a/b:1"), "not a host name"),
    (("--peer", "[zz]:1"), "not an IPv6 address"),
    (("--name", ""), "--name"),
    (("--name", " "), "--name"),
    (("--rpo", "99999999999999999999999d"), "RPO"),
    (("--rpo", "3700d"), "too long"),
    (("--rpo", "1" + "0" * 400), "too long"),
    (("--peer", "127.0.0.1:1", "--verify-every", ""), "--verify-every"),
])
def test_mount_refuses_bad_options(tmp_path, no_stray_mount, args, expect):
    src = tmp_path / "src"
    src.mkdir()
    line = fails("mount", str(src), *args, expect=expect)
    assert vrfs("mount", str(src), *args, check=False).returncode == 2, line
    assert not is_mounted(src)
    assert list(src.iterdir()) == []


def test_sizes_that_overflow_are_refused(tmp_path):
    r = vrfs("verify", str(tmp_path), "--rate", "99999999999999999999999T", check=False)
    assert r.returncode == 2, r.stderr
    fails("verify", str(tmp_path), "--rate", "99999999999999999999999T", expect="too large")
    fails("verify", str(tmp_path), "--wait", "99999999999999999999999d", expect="too long")
    fails("umount", str(tmp_path), "--timeout", "99999999999999999999999d", expect="too long")


def test_parse_limits():
    from vrfs.errors import UserError
    from vrfs.parse import parse_address, parse_duration, parse_size
    assert parse_address("dr-site.example.com:7000") == ("dr-site.example.com", 7000)
    assert parse_address("[fe80::1%eth0]:5") == ("fe80::1%eth0", 5)
    assert parse_address("10.0.0.1")[0] == "10.0.0.1"
    assert parse_duration("3650d") == 3650 * 86400
    assert parse_size("1048576T") == 1 << 60
    for bad in ("a..b:1", "-a:1", "x" * 300 + ":1", "hé:1", "a\nb:1"):
        with pytest.raises(UserError):
            parse_address(bad)
    with pytest.raises(UserError):
        parse_size("1048577T")


@pytest.mark.parametrize("config, expect", [
    ({"block_size": 1000, "extent_size": 4 << 20}, "block_size 1000"),
    ({"block_size": 65536, "extent_size": 0}, "extent_size 0"),
    ({"block_size": 65536, "extent_size": 65536 + 4096}, "extent_size"),
    ({"block_size": 65536, "extent_size": 1 << 50}, "extent_size"),
    ({"block_size": "65536", "extent_size": 4 << 20}, "block_size"),
    ({"block_size": 65536}, "extent_size"),
    ([1, 2], "damaged"),
])
def test_mount_refuses_a_bad_datastore_json(tmp_path, no_stray_mount, config, expect):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / ".vrfs").mkdir()
    (src / ".vrfs" / "datastore.json").write_text(json.dumps(config))
    line = fails("mount", str(src), str(mnt), expect=expect)
    assert f"{src}/.vrfs/datastore.json" in line
    assert not is_mounted(mnt)


def test_mount_refuses_a_state_dir_that_is_a_file(tmp_path, no_stray_mount):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / ".vrfs").write_text("not a directory")
    fails("mount", str(src), str(mnt), expect=f"{src}/.vrfs is not a directory")
    assert not is_mounted(mnt)


def test_output_to_a_closed_pipe_is_quiet(tmp_path, mount_factory):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    for i in range(400):  # far more status than a pipe holds
        (src / f"disk{i:03}.raw").write_bytes(b"")
    mount_factory(src, mnt)
    for args in (["status", str(mnt), "--json"], ["status", str(mnt)], ["--help"]):
        cmd = " ".join(map(repr, vrfs_command(*args))) + " | head -1"
        r = subprocess.run(["bash", "-c", cmd + "; echo rc=${PIPESTATUS[0]} >&2"], capture_output=True,
                           text=True, env=vrfs_env(), cwd=REPO, timeout=30)
        assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1] in ("rc=0", "rc=141"), r.stderr
        assert len(r.stdout.splitlines()) == 1


@pytest.mark.parametrize("io_encoding", [None, "utf-8:strict"])
def test_status_shows_names_that_are_not_utf8(tmp_path, mount_factory, io_encoding):
    """Under LC_ALL=C.UTF-8 (which Python 3.11 relaxes to surrogateescape) and under a strict
    UTF-8 locale such as en_US.UTF-8 (emulated with PYTHONIOENCODING=utf-8:strict)."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    (src / "vm1").mkdir(parents=True)
    mnt.mkdir()
    name = b"vm1/\xff.raw"
    with open(os.fsencode(src) + b"/" + name, "wb") as f:
        f.write(b"x" * 70000)
    env = vrfs_env({"LC_ALL": "C.UTF-8"})
    env.pop("PYTHONIOENCODING", None)
    if io_encoding:
        env["PYTHONIOENCODING"] = io_encoding
    m = mount_factory(src, mnt, env=env)
    with open(os.fsencode(mnt) + b"/" + name, "r+b") as f:
        f.write(b"y")

    def status(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run(vrfs_command("status", str(mnt), *args), capture_output=True, env=env,
                           cwd=REPO, timeout=30)
        assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode(errors="replace")
        return r

    disks = json.loads(status("--json").stdout)
    assert [os.fsencode(d["path"]) for d in disks] == [name]
    human = status().stdout
    assert b"vm1/\\xff.raw" in human, human
    assert m.proc.poll() is None


@pytest.mark.timeout(90)
def test_status_and_umount_give_up_on_a_daemon_that_does_not_answer(tmp_path, mount_factory):
    from vrfs.mountinfo import ANSWER_TIMEOUT
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    m = mount_factory(src, mnt)
    pid = m.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        def ask(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
            started = time.monotonic()
            r = vrfs(*args, check=False, timeout=ANSWER_TIMEOUT + 20)
            return r, time.monotonic() - started
        commands = (["status", str(mnt)], ["status", str(mnt), "--json"], ["umount", str(mnt)])
        with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:  # each waits out the same timeout
            answers = list(pool.map(ask, commands))
        for args, (r, took) in zip(commands, answers, strict=True):
            assert r.returncode != 0
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("vrfs: ") and "does not answer" in lines[0], r.stderr
            assert took < ANSWER_TIMEOUT + 5, (args, took)
        assert is_mounted(mnt)  # nothing was unmounted behind the stopped daemon's back
    finally:
        os.kill(pid, signal.SIGCONT)
    m.umount()


def _human_status(mnt) -> list[str]:
    return vrfs("status", str(mnt)).stdout.splitlines()


def _line_under(lines: list[str], path: str) -> str:
    """The indented lines under a disk's row, joined."""
    at = next(i for i, line in enumerate(lines) if line.startswith(path + " "))
    under = []
    for line in lines[at + 1:]:
        if not line.startswith("    "):
            break
        under.append(line)
    assert under, lines
    return "\n".join(under)


@pytest.mark.timeout(120)
def test_status_says_why_a_disk_is_not_in_sync(tmp_path, mount_factory, stack):
    from servehelpers import free_port
    from sitehelpers import Site

    # A disk that was in sync: the receiver goes away, its port is closed.
    site = Site(tmp_path, mount_factory, stack).serve().start_mount()
    (site.mnt / "vm1").mkdir()
    (site.mnt / "vm1" / "disk.raw").write_bytes(os.urandom(100_000))
    site.wait_in_sync("vm1/disk.raw")
    assert not any(line.startswith("    ") for line in _human_status(site.mnt))
    port = site.server.port
    site.server.stop()
    site.wait("disconnected", lambda st: st["vm1/disk.raw"]["state"] == "disconnected"
              and "cannot reach" in st["vm1/disk.raw"].get("error", ""))
    under = _line_under(_human_status(site.mnt), "vm1/disk.raw")
    assert f"127.0.0.1:{port}" in under and "refused" in under.lower(), under

    # A new datastore whose --peer was never reachable: its disks wait for their first full sync,
    # one because it predates tracking (that reason and the link's error are both shown).
    src, mnt = tmp_path / "src2", tmp_path / "mnt2"
    (src / "vm2").mkdir(parents=True)
    mnt.mkdir()
    (src / "vm2" / "old.raw").write_bytes(b"o" * 70_000)
    closed = free_port()
    mount_factory(src, mnt, "--peer", f"127.0.0.1:{closed}", "--name", "hv2")
    (mnt / "vm2" / "disk.raw").write_bytes(b"x" * 70_000)
    with open(mnt / "vm2" / "old.raw", "r+b") as f:
        f.write(b"y")
    deadline = time.monotonic() + 20
    while True:
        lines = _human_status(mnt)
        under = "\n".join(line for line in lines if line.startswith("    "))
        if f"127.0.0.1:{closed}" in under or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for path in ("vm2/disk.raw", "vm2/old.raw"):
        under = _line_under(lines, path)
        assert f"cannot reach 127.0.0.1:{closed}" in under and "refused" in under.lower(), lines
    assert "predates tracking" in _line_under(lines, "vm2/old.raw"), lines


def test_every_state_but_in_sync_has_a_why():
    from vrfs.status import _why
    assert _why({"state": "in-sync", "error": "old"}) == []
    assert _why({"state": "disconnected"}) == ["not connected to the DR site"]
    assert _why({"state": "disconnected", "error": "cannot reach h:1: refused"}) == ["cannot reach h:1: refused"]
    for state in ("refused", "fenced", "diverged", "syncing", "full-sync"):
        assert _why({"state": state, "error": "the receiver refused the last cycle: x"}) == [
            "the receiver refused the last cycle: x"]
    for state in ("refused", "fenced", "diverged"):
        assert _why({"state": state}) and all(_why({"state": state}))
    assert _why({"state": "full-sync", "reason": "r", "error": "e"}) == ["r", "e"]
    assert _why({"state": "full-sync", "reason": "same", "error": "same"}) == ["same"]
