"""Status and metrics an operator can trust: the lag counts a cycle as shipped
only once the DR site committed it, an RPO violation shows in status, in the
log (once per change) and in /metrics; both daemons serve Prometheus metrics.

Real daemons on 127.0.0.1; processes are ended (and stopped ones continued)
by PID in cleanup."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mounthelpers import is_mounted, vrfs
from servehelpers import REPO, free_port, vrfs_command, vrfs_env
from sitehelpers import NAME, Site, fsync_path
from tlshelpers import mount_args

pytestmark = pytest.mark.timeout(60)


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of http://127.0.0.1:PORT/metrics: name -> [(labels, value)]."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=")
        text = answer.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    found = [v for lab, v in samples.get(name, []) if all(lab.get(k) == want for k, want in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def metric_site(tmp_path, mount_factory, stack, rpo: str = "2s") -> tuple[Site, int, int]:
    """A Site whose mount and receiver both serve /metrics; returns it and the two ports."""
    site = Site(tmp_path, mount_factory, stack)
    serve_port, mount_port = free_port(), free_port()
    site.server.args = ("--metrics", f"127.0.0.1:{serve_port}")
    site.serve()
    site.mount = mount_factory(site.src, site.mnt, "--peer", f"127.0.0.1:{site.server.port}", "--name", NAME,
                               "--rpo", rpo, "--metrics", f"127.0.0.1:{mount_port}")
    return site, mount_port, serve_port


def write(path, data: bytes, offset: int = 0) -> None:
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.seek(offset)
        f.write(data)
    fsync_path(path)


def test_lag_grows_and_rpo_is_flagged_while_the_receiver_is_stopped_mid_cycle(tmp_path, mount_factory, stack):
    site, mport, _ = metric_site(tmp_path, mount_factory, stack)
    (site.mnt / "vm1").mkdir()
    disk = site.mnt / "vm1" / "a.raw"
    write(disk, os.urandom(256 << 10))
    before = site.wait_in_sync("vm1/a.raw")["vm1/a.raw"]
    assert before["lag_seconds"] == 0 and before["rpo_violated"] is False and before["lag_basis"] == "none"
    point = before["last_point"]["id"]

    pid = site.server.proc.pid
    os.kill(pid, signal.SIGSTOP)
    stack.callback(os.kill, pid, signal.SIGCONT)  # runs before the server is stopped
    written = time.monotonic()
    write(disk, os.urandom(128 << 10), 64 << 10)  # the only write; its cycle starts and hangs

    # The cycle is cut (after RPO/2) and sent into the stopped receiver: not acknowledged, not shipped.
    st = site.wait("cut and stuck", lambda s: s["vm1/a.raw"]["state"] == "syncing"
                   and s["vm1/a.raw"]["lag_seconds"] > 3, timeout=20)["vm1/a.raw"]
    assert st["last_point"]["id"] == point, st
    assert st["rpo_violated"] is True and st["lag_basis"] == "write", st
    lag1 = st["lag_seconds"]
    assert lag1 <= time.monotonic() - written + 0.5
    time.sleep(1.5)
    st = site.status()["vm1/a.raw"]
    assert st["lag_seconds"] >= lag1 + 1, (lag1, st)
    human = vrfs("status", str(site.mnt)).stdout
    assert "RPO!" in human, human
    samples = scrape(mport)
    assert value(samples, "vrfs_rpo_violated", source=NAME, group="vm1") == 1
    assert value(samples, "vrfs_lag_seconds", source=NAME, group="vm1") >= lag1 + 1
    assert value(samples, "vrfs_rpo_seconds", source=NAME, group="vm1") == 2
    assert value(samples, "vrfs_point_age_seconds", source=NAME, group="vm1") >= lag1 + 1
    time.sleep(1)  # more polls: still one log line
    assert site.mount.log().count("vm1: RPO violated") == 1, site.mount.log()[-2000:]

    os.kill(pid, signal.SIGCONT)
    after = site.wait_in_sync("vm1/a.raw", after={"vm1/a.raw": point}, timeout=40)["vm1/a.raw"]
    assert after["lag_seconds"] == 0 and after["rpo_violated"] is False, after
    deadline = time.monotonic() + 5
    while "vm1: RPO met again" not in site.mount.log():
        assert time.monotonic() < deadline, site.mount.log()[-2000:]
        time.sleep(0.1)
    log = site.mount.log()
    assert log.count("vm1: RPO violated") == 1 and log.count("vm1: RPO met again") == 1, log[-2000:]
    samples = scrape(mport)
    assert value(samples, "vrfs_rpo_violated", source=NAME, group="vm1") == 0
    assert value(samples, "vrfs_lag_seconds", source=NAME, group="vm1") == 0


def test_both_daemons_serve_metrics_that_follow_the_cycles(tmp_path, mount_factory, stack):
    site, mport, sport = metric_site(tmp_path, mount_factory, stack, rpo="1s")
    (site.mnt / "vm1").mkdir()
    disk = site.mnt / "vm1" / "a.raw"
    write(disk, os.urandom(512 << 10))
    site.wait_in_sync("vm1/a.raw")
    time.sleep(1.5)
    src1, dr1 = scrape(mport), scrape(sport)
    labels = {"source": NAME, "group": "vm1"}
    for name in ("vrfs_lag_seconds", "vrfs_point_age_seconds", "vrfs_rpo_seconds", "vrfs_rpo_violated",
                 "vrfs_rpo_breach_predicted", "vrfs_dirty_bytes", "vrfs_sent_bytes_total", "vrfs_cycles_total",
                 "vrfs_cycle_errors_total", "vrfs_cycle_refusals_total"):
        assert [lab for lab, _ in src1[name]] == [labels], (name, src1[name])
    assert value(src1, "vrfs_connected", source=NAME) == 1
    assert value(src1, "vrfs_rpo_breach_predicted", **labels) == 0  # nothing predicted it: absent means 0
    assert value(src1, "vrfs_sent_bytes_total", **labels) > 100_000  # random data does not compress
    assert value(src1, "vrfs_dirty_bytes", **labels) == 0
    assert value(src1, "vrfs_cycle_errors_total", **labels) == 0
    age1 = value(src1, "vrfs_point_age_seconds", **labels)
    assert age1 >= 1.4
    assert "process_cpu_seconds_total" in src1
    for name in ("vrfs_point_age_seconds", "vrfs_point_id", "vrfs_cycles_committed_total",
                 "vrfs_received_bytes_total", "vrfs_cycle_refusals_total"):
        assert labels in [lab for lab, _ in dr1[name]], (name, dr1.get(name))
    assert value(dr1, "vrfs_cycles_committed_total", **labels) == value(src1, "vrfs_cycles_total", **labels) >= 1
    assert value(dr1, "vrfs_received_bytes_total", **labels) > 100_000

    point = site.status()["vm1/a.raw"]["last_point"]["id"]
    write(disk, os.urandom(256 << 10), 128 << 10)
    site.wait_in_sync("vm1/a.raw", after={"vm1/a.raw": point})
    src2, dr2 = scrape(mport), scrape(sport)
    assert value(src2, "vrfs_sent_bytes_total", **labels) >= value(src1, "vrfs_sent_bytes_total", **labels) + 200_000
    assert value(src2, "vrfs_cycles_total", **labels) > value(src1, "vrfs_cycles_total", **labels)
    assert value(src2, "vrfs_point_age_seconds", **labels) < age1  # a new point: its age started again
    assert value(dr2, "vrfs_received_bytes_total", **labels) > value(dr1, "vrfs_received_bytes_total", **labels)
    assert value(dr2, "vrfs_point_id", **labels) == site.status()["vm1/a.raw"]["last_point"]["id"]
    assert value(dr2, "vrfs_point_age_seconds", **labels) < 5

    # A scraper that speaks nonsense, asks elsewhere or stalls changes nothing.
    with pytest.raises(urllib.error.HTTPError) as wrong:
        urllib.request.urlopen(f"http://127.0.0.1:{mport}/nope", timeout=5)
    assert wrong.value.code == 404
    with socket.create_connection(("127.0.0.1", sport)) as s:
        s.sendall(b"\x16\x03\x01garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 405")
    stalled = socket.create_connection(("127.0.0.1", mport))  # says nothing
    try:
        assert value(scrape(mport), "vrfs_connected", source=NAME) == 1
    finally:
        stalled.close()
    assert site.mount.proc.poll() is None and site.server.proc.poll() is None


def test_metrics_port_in_use_is_a_one_line_startup_error(tmp_path, mount_factory, stack):
    busy = socket.socket()
    stack.callback(busy.close)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    args = ("--peer", f"127.0.0.1:{free_port()}", "--name", NAME, "--metrics", f"127.0.0.1:{port}")
    r = subprocess.run(vrfs_command("mount", str(src), str(mnt), *args, *mount_args(args)), capture_output=True,
                       text=True, env=vrfs_env(), cwd=REPO, timeout=30)
    assert r.returncode == 1 and not is_mounted(mnt), r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in lines[0], r.stderr
    from tlshelpers import serve_args
    r = subprocess.run(vrfs_command("serve", "--listen", f"127.0.0.1:{free_port()}", "--store",
                                    f"dir:{tmp_path / 'store'}", "--metrics", f"127.0.0.1:{port}", *serve_args()),
                       capture_output=True, text=True, env=vrfs_env(), cwd=REPO, timeout=30)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "cannot serve metrics" in lines[0], r.stderr
    r = vrfs("mount", str(src), str(mnt), "--metrics", "127.0.0.1:9", check=False)
    assert r.returncode == 2 and "--metrics needs --peer" in r.stderr, r.stderr
    r = vrfs("serve", "--store", f"dir:{tmp_path / 'store'}", "--metrics", "localhost", "--insecure", check=False)
    assert r.returncode == 2 and "HOST:PORT" in r.stderr, r.stderr


def test_status_watch_redraws_a_table_that_fits_80_columns(tmp_path, mount_factory, stack):
    site, _, _ = metric_site(tmp_path, mount_factory, stack)
    (site.mnt / "vm1").mkdir()
    write(site.mnt / "vm1" / "a.raw", os.urandom(128 << 10))
    st = site.wait_in_sync("vm1/a.raw")["vm1/a.raw"]
    for key in ("lag_seconds", "lag_basis", "rpo_seconds", "rpo_violated", "rpo_breach_predicted",
                "point_age_seconds", "rate_bytes_per_second", "eta_seconds",
                "state", "last_point", "bytes_sent", "bytes_dirty_shipped", "dirty_bytes", "size", "group"):
        assert key in st, (key, st)
    env = vrfs_env({"COLUMNS": "80"})
    watch = subprocess.Popen(vrfs_command("status", str(site.mnt), "--watch", "--interval", "0.3s"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    stack.callback(lambda: watch.poll() is None and watch.kill())
    time.sleep(1.5)
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=10)
    assert watch.returncode == 0 and "Traceback" not in err, err
    assert out.count("GROUP ") >= 2 and out.count("vm1/a.raw ") >= 2, out
    table = [line for line in out.splitlines() if line.startswith(("GROUP", "PATH", "vm1"))]
    assert len(table) >= 8 and all(len(line) <= 80 for line in table), out
    row = next(line for line in out.splitlines() if line.startswith("vm1 "))
    assert "in-sync" in row and "/2s" in row, row
    assert vrfs("status", str(site.mnt), "--watch", "--json", check=False).returncode == 2


def test_status_rendering_of_a_full_sync_and_a_violated_rpo():
    from vrfs.status import render_mount
    base = {"source": "/src", "mountpoint": "/mnt", "pid": 1, "block_size": 65536, "peer": "dr:7400",
            "connected": True, "link": "TLS 1.3", "name": "hv1"}
    disks = [
        {"path": "vm1/big.raw", "group": "vm1", "size": 10 << 30, "dirty_bytes": 4 << 30, "state": "full-sync",
         "progress": 1.0, "sync_phase": "sending", "cycle_progress": 0.25, "eta_seconds": 95.0,
         "rate_bytes_per_second": 110e6, "lag_seconds": 400.0, "rpo_seconds": 300.0, "rpo_violated": True,
         "last_point": None, "point_age_seconds": None, "bytes_sent": 0},
        {"path": "vm2/a-disk-with-a-rather-long-name-indeed.qcow2", "group": "vm2", "size": 1 << 30,
         "dirty_bytes": 0, "state": "full-sync", "progress": 0.4, "sync_phase": "comparing", "eta_seconds": 30.0,
         "rate_bytes_per_second": 0.0, "lag_seconds": 12.0, "rpo_seconds": 300.0, "rpo_violated": False,
         "rpo_breach_predicted": True, "last_point": {"id": 7, "cut_time": time.time() - 60},
         "point_age_seconds": 60.0, "bytes_sent": 5 << 20},
    ]
    lines = render_mount(dict(base, disks=disks), width=80)
    text = "\n".join(lines)
    assert all(len(line) <= 80 for line in lines), text
    assert "[######..................]  25% sending at 104.9M/s, ETA 1m35s" in text, text
    assert " 40% comparing, ETA 30s" in text, text
    assert "6m40s/5m RPO!" in text and "12s/5m RPO?" in text, text
    assert "vm2/a-disk-with-a-rather-long-name-indeed.qcow2\n" in text + "\n", text
    assert json.dumps(disks)  # the fields render_mount reads are JSON as the daemon sends them
