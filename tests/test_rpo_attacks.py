"""The RPO engine's surfaces under attack and bad luck: per-disk settings set
by many processes at once, a damaged settings file, configuration files that
are no text, file names that try to forge lines of the log or of `vrfs
status`, and group names that the Prometheus exposition must carry.

Real mounts (and, for metrics, a real receiver) on 127.0.0.1; the fixtures
unmount and end by PID whatever a test started, even when it fails."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import select
import socket
import subprocess
import threading
import time

import pytest

from mounthelpers import vrfs
from servehelpers import REPO, Server, free_port, vrfs_command, vrfs_env
from sitehelpers import NAME, Site
from test_status_metrics import scrape

pytestmark = pytest.mark.timeout(60)


def datastore(tmp_path, mount_factory, *args: str, disks: dict[bytes, int] | None = None):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir(exist_ok=True)
    mnt.mkdir(exist_ok=True)
    for name, size in (disks or {}).items():
        path = os.fsencode(src) + b"/" + name
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(os.urandom(size))
    return src, mnt, mount_factory(src, mnt, *args)


def test_settings_set_on_many_disks_at_once_all_take_effect(tmp_path, mount_factory) -> None:
    """Each change used to be staged from the settings as they were before the
    previous change was saved: of 16 at once, most vanished, every setfattr
    said it succeeded."""
    count = 16
    src, mnt, m = datastore(tmp_path, mount_factory, disks={f"vm1/d{i}.raw".encode(): 4096 for i in range(count)})
    want = {f"d{i}.raw": f"{i + 10}s" for i in range(count)}
    start = threading.Barrier(count)
    failed: list[Exception] = []

    def set_one(name: str) -> None:
        try:
            start.wait(10)
            os.setxattr(mnt / "vm1" / name, "user.vrfs.rpo", want[name].encode())
        except Exception as exc:  # reported by the test, not by the thread
            failed.append(exc)

    threads = [threading.Thread(target=set_one, args=(name,)) for name in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failed, failed
    got = {name: os.getxattr(mnt / "vm1" / name, "user.vrfs.rpo").decode() for name in want}
    assert got == want
    saved = json.loads((src / ".vrfs" / "settings.json").read_text())["disks"]
    assert sorted(v["rpo"] for v in saved.values()) == sorted(int(v[:-1]) for v in want.values())

    # Removals at once as well: every one takes effect, none comes back.
    removed = [f"d{i}.raw" for i in range(0, count, 2)]
    threads = [threading.Thread(target=os.removexattr, args=(mnt / "vm1" / name, "user.vrfs.rpo"))
               for name in removed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for name in want:
        assert os.getxattr(mnt / "vm1" / name, "user.vrfs.rpo").decode() == ("5m" if name in removed else want[name])

    # A 64 KiB value is refused with one log line of reasonable length.
    with pytest.raises(OSError) as caught:
        os.setxattr(mnt / "vm1" / "d1.raw", "user.vrfs.rpo", b"9" * 65536)
    assert caught.value.errno == errno.EINVAL
    refusals = [line for line in m.log().splitlines() if "refused" in line]
    assert len(refusals) == 1 and len(refusals[0]) < 400, refusals
    assert m.proc.poll() is None


@pytest.mark.parametrize("damage", ["directory", "nested", "fifo"])
def test_a_damaged_settings_file_costs_the_settings_never_the_mount(tmp_path, mount_factory, damage) -> None:
    state = tmp_path / "src" / ".vrfs"
    state.mkdir(parents=True)
    settings = state / "settings.json"
    if damage == "directory":
        settings.mkdir()
    elif damage == "nested":
        settings.write_text('{"version": 1, "disks": ' + "[" * 200_000 + "]" * 200_000 + "}")
    else:
        os.mkfifo(settings)
    src, mnt, m = datastore(tmp_path, mount_factory, disks={b"vm1/a.raw": 4096})
    assert m.proc.poll() is None
    assert "settings.json is damaged" in m.log(), m.log()
    assert os.getxattr(mnt / "vm1" / "a.raw", "user.vrfs.rpo") == b"5m"
    assert (mnt / "vm1" / "a.raw").read_bytes() == (src / "vm1" / "a.raw").read_bytes()


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # an endless file must not eat the machine


@pytest.mark.parametrize("content, expect", [
    (b'[default]\nrpo = "1m"\n# \xff\xfe\n', "not UTF-8"),
    (b"[default]\nrpo = " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "not TOML"),
    (None, "not a configuration file"),  # /dev/zero
])
def test_a_config_that_is_no_text_is_a_one_line_error(tmp_path, content, expect) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    config = tmp_path / "vrfs.toml"
    if content is None:
        config = "/dev/zero"
    else:
        config.write_bytes(content)
    r = subprocess.run(vrfs_command("mount", str(src), str(mnt), "--config", str(config), "--foreground"),
                       capture_output=True, text=True, env=vrfs_env(), cwd=REPO, timeout=30,
                       preexec_fn=_limit_memory)
    assert r.returncode != 0
    assert r.stderr.startswith("vrfs: --config") and len(r.stderr.splitlines()) == 1, r.stderr[-2000:]
    assert expect in r.stderr, r.stderr
    assert not os.path.ismount(mnt)


LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} vrfs\.\w+ [A-Z]+ ")
FORGED = "2030-01-01 00:00:00,000 vrfs.shipper INFO vm9: RPO met again"


def test_a_file_name_forges_no_log_line_and_no_status_row(tmp_path, mount_factory) -> None:
    evil = f"x\n{FORGED}\x1b[2J\n".encode() + b"\xff.raw"
    src, mnt, m = datastore(tmp_path, mount_factory, disks={b"vm1/a.raw": 4096})
    path = os.fsencode(mnt) + b"/vm1/" + evil
    with open(path, "wb") as f:
        f.write(b"y" * 70000)
    with pytest.raises(OSError) as caught:
        os.setxattr(path, "user.vrfs.rpo", b"soon")
    assert caught.value.errno == errno.EINVAL
    os.setxattr(path, "user.vrfs.rpo", b"7s")
    shown = "vm1/x\\n" + FORGED + "\\x1b[2J\\n\\xff.raw"

    log = m.log_path.read_bytes().decode("utf-8", "backslashreplace")
    lines = log.splitlines()
    assert all(LOG_LINE.match(line) for line in lines), log[-3000:]
    assert f"{shown}: user.vrfs.rpo=b'soon' refused" in log and f"{shown}: rpo set to 7s" in log, log[-3000:]

    out = vrfs("status", str(mnt)).stdout
    assert "\x1b" not in out and not any(line.startswith(FORGED) for line in out.splitlines()), out
    assert shown in out, out
    assert [d["path"] for d in json.loads(vrfs("status", str(mnt), "--json").stdout)] == \
        ["vm1/a.raw", os.fsdecode(b"vm1/" + evil)]
    assert m.proc.poll() is None


def test_metrics_carry_group_names_with_quotes_newlines_and_bytes_that_are_not_utf8(
        tmp_path, mount_factory, stack) -> None:
    """One group named by bytes that are not UTF-8 used to make every scrape
    of both daemons fail (500): no metrics for any group."""
    names = [b'q"uote', b"back\\slash", b"new\nline", b"bad\xff", b"plain"]
    site = Site(tmp_path, mount_factory, stack)
    serve_port, mount_port = free_port(), free_port()
    site.server.args = ("--metrics", f"127.0.0.1:{serve_port}")
    site.serve()
    site.mount = mount_factory(site.src, site.mnt, "--peer", f"127.0.0.1:{site.server.port}", "--name", NAME,
                               "--rpo", "1s", "--metrics", f"127.0.0.1:{mount_port}")
    for name in names:
        directory = os.fsencode(site.mnt) + b"/" + name
        os.mkdir(directory)
        with open(directory + b"/d.raw", "wb") as f:
            f.write(os.urandom(70000))
            f.flush()
            os.fsync(f.fileno())
    # What a label says: the name, its bytes that are not UTF-8 as `ls -b` shows them.
    want = {name.decode("utf-8", "backslashreplace") for name in names}

    deadline = time.monotonic() + 40
    while True:
        dr = scrape(serve_port)
        committed = {lab["group"] for lab, v in dr.get("vrfs_point_id", []) if lab["source"] == NAME and v >= 1}
        if committed == want:
            break
        assert time.monotonic() < deadline, (committed, site.server.log()[-2000:])
        time.sleep(0.2)
    src = scrape(mount_port)
    assert {lab["group"] for lab, _ in src["vrfs_lag_seconds"]} == want
    assert {lab["group"] for lab, _ in src["vrfs_cycles_total"] if _ >= 1} == want
    for log in (site.mount.log(), site.server.log()):
        assert "collecting metrics failed" not in log, log[-3000:]


def test_limits_are_the_same_everywhere_and_refusals_say_why(tmp_path, mount_factory) -> None:
    """An RPO a disk's setting refuses was taken by `vrfs mount --rpo` and
    `vrfs plan --rpo`; a match in [default] was dropped without a word; a
    setting on a directory was EPERM with nothing in the log; --watch could
    ask the daemon back to back; plan printed 0.00 Mbit/s and 40-digit day
    counts for absurd links."""
    from test_cli import fails
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    fails("mount", str(src), str(mnt), "--rpo", "0.5s", expect="below the 1 s floor")
    fails("mount", str(src), str(mnt), "--rpo", "3650d", expect="longer than a year")
    config = tmp_path / "vrfs.toml"
    config.write_text('[default]\nmatch = "db*/*"\nrpo = "30s"\n')
    fails("mount", str(src), str(mnt), "--config", str(config), expect="[default] applies to every disk")
    assert not os.path.ismount(mnt)
    fails("plan", "--disk", "100G", "--change-rate", "10M/s", "--rpo", "30s,0.01s", expect="below the 1 s floor")
    fails("status", str(mnt), "--watch", "--interval", "0.01s", expect="at least 0.2s")
    out = vrfs("plan", "--disk", "999999T", "--change-rate", "1M/s", "--link", "1bit/s", "--rpo", "1h").stdout
    assert "link:         1 bit/s" in out and "over 100 years" in out, out
    assert "0.00 Mbit/s" not in vrfs("plan", "--disk", "1G", "--change-rate", "1K/s", "--link", "5kbit/s").stdout

    (tmp_path / "ds").mkdir()
    _, mnt, m = datastore(tmp_path / "ds", mount_factory, disks={b"vm1/d.raw": 4096})
    for target in (mnt / "vm1", mnt):
        with pytest.raises(OSError) as refused:
            os.setxattr(target, "user.vrfs.rpo", b"30s")
        assert refused.value.errno == errno.EPERM
    deadline = time.monotonic() + 5
    while m.log().count("refused: settings are per disk") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "vm1: user.vrfs.rpo refused: settings are per disk" in m.log(), m.log()[-2000:]


def test_idle_connections_cannot_keep_a_scrape_out(tmp_path, stack) -> None:
    """Eight connections that never send a request used to take every place
    for 10 s each, and a scrape was closed unanswered: anyone who could
    connect could blind the monitoring. An idle connection now gives its place
    to a newer one; scrapes in progress keep theirs."""
    port = free_port()
    server = Server(f"dir:{tmp_path / 'store'}", tmp_path / "serve.log")
    server.args = ("--metrics", f"127.0.0.1:{port}")
    server.start()
    stack.callback(server.stop)
    idle = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        stack.callback(s.close)
        idle.append(s)
    time.sleep(0.3)
    for _ in range(3):
        started = time.monotonic()
        assert "process_open_fds" in scrape(port)
        assert time.monotonic() - started < 2
    fds = len(os.listdir(f"/proc/{server.proc.pid}/fd"))
    readable, _, _ = select.select(idle, [], [], 0.5)  # closed by the server: EOF to read
    closed = sum(1 for s in readable if _closed_by_peer(s))
    assert closed >= len(idle) - 8, closed  # the rest were let go, not kept open
    assert fds < 40, fds
    assert server.proc.poll() is None


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
