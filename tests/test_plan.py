"""`vrfs plan`: the model (vrfs/plan.py) against figures computed by hand, the
input parsing, every bad input (one line, exit 2), and a measurement of a
real mount that a test writes a known number of distinct blocks to."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time

import pytest

from mounthelpers import vrfs
from servehelpers import vrfs_command, vrfs_env, REPO
from vrfs import cli, plan
from vrfs.errors import UserError
from vrfs.plancmd import build_report, parse_compression, parse_rate, parse_rpos, parse_rtt

pytestmark = pytest.mark.timeout(60)

GiB, MiB = 1 << 30, 1 << 20


# ------------------------------------------------------------------ model

def test_one_rpo_by_hand() -> None:
    # 1 MB/s of changed blocks, 2:1, RPO 60s: a cycle every 30 s carries 30 MB,
    # 15 MB on the wire; a 5 s round trip leaves 25 s: 600 kB/s = 4.8 Mbit/s.
    w = plan.Workload((10**9,), 1e6, 2.0)
    [row] = plan.plan_rows(w, [60], link=500_000, rtt=5)
    assert (row.window, row.data, row.wire) == (30, 30e6, 15e6)
    assert row.needed == pytest.approx(600_000)
    assert plan.mbit(row.needed) == pytest.approx(4.8)
    assert row.meets is False and row.spare == pytest.approx(-100_000)
    [row] = plan.plan_rows(w, [60], link=600_000, rtt=5)
    assert row.meets is True  # exactly enough is enough


def test_without_round_trips_a_steady_rate_needs_rate_over_compression() -> None:
    w = plan.Workload((100 * GiB,), 5 * MiB, 2.0)
    for rpo in (30, 300, 3600):
        assert plan.needed_rate(w, rpo) == pytest.approx(2.5 * MiB)
    assert plan.mbit(plan.needed_rate(w, 300)) == pytest.approx(20.97152)


def test_a_cycle_never_carries_more_than_every_block() -> None:
    w = plan.Workload((4 * 10**8, 6 * 10**8), 1e6, 2.0)
    assert plan.data_per_cycle(w, 3600) == 10**9
    # RPO 2h: 1 GB (not 3.6 GB) per 3600 s window, 5e8 on the wire: 138.9 kB/s
    assert plan.needed_rate(w, 7200) == pytest.approx(5e8 / 3600)


def test_round_trips_of_every_group_come_off_the_window() -> None:
    w = plan.Workload((10**9,) * 3, 1e6, 2.0, groups=3)
    # RPO 60: window 30 s, 3 commits at 1 s RTT leave 27 s for 15 MB
    assert plan.needed_rate(w, 60, rtt=1) == pytest.approx(15e6 / 27)
    # RPO 6: the 3 s window goes entirely to round trips: no link can hold it
    assert plan.needed_rate(w, 6, rtt=1) == math.inf
    [row] = plan.plan_rows(w, [6], link=1e12, rtt=1)
    assert row.meets is False


def test_shortest_rpo_by_hand() -> None:
    w = plan.Workload((10**9,), 1e6, 2.0)  # 500 kB/s on the wire
    # 1 MB/s link, 5 s RTT: W = 1e6*5 / (1e6 - 5e5) = 10 s, so RPO 20 s (and it holds exactly there)
    assert plan.shortest_rpo(w, 1e6, rtt=5) == pytest.approx(20)
    assert plan.needed_rate(w, 20, rtt=5) == pytest.approx(1e6)
    assert plan.needed_rate(w, 19.9, rtt=5) > 1e6
    # a link slower than the change rate only holds once a cycle is a whole copy:
    # W >= 1e9 / 1e6 (saturated) and W >= 5e8 / 5e5 + 5: RPO 2010 s
    assert plan.shortest_rpo(w, 500_000, rtt=5) == pytest.approx(2010)
    assert plan.needed_rate(w, 2010, rtt=5) == pytest.approx(500_000)
    assert plan.shortest_rpo(w, 1e6) == 0  # no round trips: any RPO
    assert plan.shortest_rpo(plan.Workload((10**9,), 0, 2.0), 1e6, rtt=0.1) == pytest.approx(0.2)


def test_initial_sync_by_hand() -> None:
    w = plan.Workload((6 * 10**8, 4 * 10**8), 1e6, 2.0)
    assert plan.initial_sync_seconds(w, 1e6) == pytest.approx(500)  # 1e9 / 2 / 1e6
    assert plan.initial_sync_seconds(w, 1e6, while_writing=True) == pytest.approx(1000)  # 5e8 / (1e6 - 5e5)
    assert plan.initial_sync_seconds(w, 500_000, while_writing=True) == math.inf
    sparse = plan.Workload((10**9,), 1e6, 2.0, allocated=10**8)
    assert plan.initial_sync_seconds(sparse, 1e6) == pytest.approx(50)


def test_workload_refuses_nonsense() -> None:
    for kwargs in ({"disk_sizes": ()}, {"disk_sizes": (0,)}, {"change_rate": -1.0},
                   {"change_rate": math.nan}, {"compression": 0.5}, {"groups": 0}):
        args = {"disk_sizes": (1,), "change_rate": 1.0, **kwargs}
        with pytest.raises(ValueError):
            plan.Workload(**args)


def test_report_says_plainly_what_the_link_cannot_hold() -> None:
    w = plan.Workload((100 * GiB,), 22.5e6, 1.0)  # 180 Mbit/s of changes, incompressible
    rep = build_report(w, [30, 300], link=12.5e6, rtt=0.0, ratio_basis="given")
    assert "a 100 Mbit/s link cannot hold an RPO of 30s for this change rate: it needs 180 Mbit/s" in rep["verdicts"]
    assert [r["meets"] for r in rep["rpos"]] == [False, False]
    assert rep["rpos"][0]["needed_mbit_per_second"] == pytest.approx(180)
    assert rep["initial_sync_while_writing_seconds"] is None  # JSON has no infinity
    json.dumps(rep, allow_nan=False)


# ---------------------------------------------------------------- parsing

def test_rates_and_units() -> None:
    assert parse_rate("100Mbit/s", "link") == 12.5e6
    assert parse_rate("1Gbps", "link") == 125e6
    assert parse_rate("1 gbit / s", "link") == 125e6
    assert parse_rate("5M/s", "r") == parse_rate("5MB/s", "r") == parse_rate("5MiB/s", "r") == 5 * MiB
    assert parse_rate("300M/m", "r") == 5 * MiB
    assert parse_rate("200G/d", "r") == pytest.approx(200 * GiB / 86400)
    assert parse_rate("2%/h", "r", 100 * GiB) == pytest.approx(2 * GiB / 3600)
    assert parse_rate("0.5K/s", "r") == 512
    assert parse_compression("2") == parse_compression("2x") == parse_compression("2:1") == 2.0
    assert parse_rtt("40ms") == pytest.approx(0.04) and parse_rtt("0.1s") == 0.1 and parse_rtt("0") == 0
    assert parse_rpos(["30s,5m", "1h"]) == [30, 300, 3600]
    assert parse_rpos(None) == list(plan.DEFAULT_RPOS)


@pytest.mark.parametrize("argv, expect", [
    (["--disk", "100G"], "needs a change rate"),
    (["--change-rate", "5M/s"], "needs the disks"),
    (["--disk", "lots", "--change-rate", "5M/s"], "bad disk size 'lots'"),
    (["--disk", "0", "--change-rate", "5M/s"], "must be more than 0"),
    (["--disk", "2000000T", "--change-rate", "5M/s"], "too large"),
    (["--disks", "3", "--change-rate", "5M/s"], "--disks N and --size SIZE go together"),
    (["--size", "1G", "--change-rate", "5M/s"], "--disks N and --size SIZE go together"),
    (["--disks", "0", "--size", "1G", "--change-rate", "5M/s"], "bad number of disks '0'"),
    (["--disks", "many", "--size", "1G", "--change-rate", "5M/s"], "bad number of disks 'many'"),
    (["--disks", "2", "--size", "0", "--change-rate", "5M/s"], "bad disk size '0'"),
    (["--disk", "1G", "--change-rate", "fast"], "bad change rate 'fast'"),
    (["--disk", "1G", "--change-rate", "5M"], "expected a time after '/'"),
    (["--disk", "1G", "--change-rate", "5M/y"], "expected a time after '/'"),
    (["--disk", "1G", "--change-rate", "10Mb/s"], "write 10Mbit/s for bits or 10MB/s for bytes"),
    (["--disk", "1G", "--change-rate", "5Xbit/s"], "unknown unit 'Xbit'"),
    (["--disk", "1G", "--change-rate", "5Mbps/s"], "already per second"),
    (["--disk", "1G", "--change-rate", "2000000%/h"], "too large"),
    (["--disk", "1G", "--change-rate", "99999999999T/s"], "too large"),
    (["--disk", "1G", "--change-rate", "5M/s", "--link", "2%/h"], "a percentage is a change rate"),
    (["--disk", "1G", "--change-rate", "5M/s", "--link", "0Mbit/s"], "bad link rate '0Mbit/s': must be more"),
    (["--disk", "1G", "--change-rate", "5M/s", "--rpo", "0"], "bad RPO '0'"),
    (["--disk", "1G", "--change-rate", "5M/s", "--rpo", "5x"], "bad RPO '5x'"),
    (["--disk", "1G", "--change-rate", "5M/s", "--rpo", "5m,,1h"], "an empty item"),
    (["--disk", "1G", "--change-rate", "5M/s", "--compression", "0.5"], "from 1 (incompressible) to 100"),
    (["--disk", "1G", "--change-rate", "5M/s", "--compression", "two"], "bad compression ratio 'two'"),
    (["--disk", "1G", "--change-rate", "5M/s", "--rtt", "40"], "bad RTT '40'"),
    (["--disk", "1G", "--change-rate", "5M/s", "--rtt", "20s"], "more than 10 s"),
    (["--disk", "1G", "--change-rate", "5M/s", "--for", "10s"], "--for is the sampling time of --measure"),
    (["--measure", "/", "--for", "0.5s"], "bad sampling time '0.5s'"),
    (["--measure", "/", "--change-rate", "5M/s"], "not allowed with argument"),
    (["--measure", "/nonexistent/x"], "/nonexistent/x is not a vrfs mount"),
    (["--disk", "1G", "--change-rate", "5M/s", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_every_bad_input_is_one_line_and_exit_2(argv, expect, capsys) -> None:
    assert cli.main(["plan", *argv]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("vrfs: "), err
    assert expect in lines[0], lines[0]


def test_bad_input_from_the_shell_and_a_good_plan() -> None:
    r = vrfs("plan", "--disk", "1G", "--change-rate", "5M/s", "--link", "2%/h", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("vrfs: "), r.stderr
    r = vrfs("plan", "--disks", "4", "--size", "100G", "--change-rate", "22.5MB/s", "--compression", "1",
             "--link", "100Mbit/s", "--rpo", "30s,5m", "--rtt", "40ms")
    # 22.5 MiB/s = 188.7 Mbit/s; RPO 30s: 15 s window less 4 commits at 40 ms: 188.7 * 15 / 14.84 = 190.8
    assert "A 100 Mbit/s link cannot hold an RPO of 30s for this change rate: it needs 191 Mbit/s." in r.stdout
    assert "NO, 90.8 Mbit/s short" in r.stdout and "is slower than the change rate (189 Mbit/s on the wire)" in r.stdout
    # 400 GiB / 12.5 MB/s = 34360 s
    assert "Initial sync: 400.0G / 1.00 over 100 Mbit/s: 9h32m (never while the VMs keep changing" in r.stdout
    rep = json.loads(vrfs("plan", "--disk", "100G", "--change-rate", "2%/h", "--json").stdout)
    assert rep["change_rate"]["bytes_per_second"] == pytest.approx(2 * GiB / 3600)
    assert rep["change_rate"]["upper_bound"] is True and rep["link"] is None
    assert [r["rpo_seconds"] for r in rep["rpos"]] == list(plan.DEFAULT_RPOS)


def test_bitmap_counts_what_it_newly_sets() -> None:
    from vrfs.bitmap import Bitmap
    b = Bitmap()
    assert b.set_range(3, 20) == 17
    assert b.set_range(0, 30) == 13
    assert b.set_range(5, 9) == 0
    assert b.count_range(0, 40) == 30 and b.count_range(2, 4) == 2 and b.count_range(30, 100) == 0


# ------------------------------------------------------------ measurement

@pytest.mark.timeout(40)
def test_measure_counts_distinct_blocks_written_during_the_sample(tmp_path, mount_factory) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    mount_factory(src, mnt)
    bs = 64 * 1024
    disk = mnt / "vm1" / "disk0.raw"
    disk.parent.mkdir()
    before = 40  # dirty before the sample: not counted
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
        for i in range(before):
            os.pwrite(f.fileno(), b"\1" * bs, i * bs)
        os.fsync(f.fileno())
    sample = 3.0
    proc = subprocess.Popen(vrfs_command("plan", "--measure", str(mnt), "--for", f"{sample}s", "--json",
                                         "--link", "100Mbit/s", "--rpo", "1m"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=vrfs_env(), cwd=REPO)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # after the first sample
        assert line.startswith("measuring "), line + proc.stderr.read()
        t0 = time.monotonic()
        distinct = 200
        with open(disk, "r+b") as f:
            for rewrite in range(3):  # each block three times: counted once
                for i in range(before, before + distinct):
                    os.pwrite(f.fileno(), bytes([rewrite + 2]) * bs, i * bs)
                os.fsync(f.fileno())
        assert time.monotonic() - t0 < sample, "the writes took longer than the sample: the test proves nothing"
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    rep = json.loads(out)
    m = rep["measurement"]
    assert m["changed_blocks"] == distinct and m["changed_bytes"] == distinct * bs
    assert sample <= m["seconds"] < sample + 2
    expected_rate = distinct * bs / sample
    assert rep["change_rate"]["bytes_per_second"] == pytest.approx(expected_rate, rel=0.25)
    assert rep["change_rate"]["basis"] == "measured" and rep["change_rate"]["upper_bound"] is False
    assert rep["compression"] == {"ratio": plan.DEFAULT_COMPRESSION, "basis": "assumed"}  # nothing shipped
    assert rep["disks"]["size_bytes"] == 64 * MiB and rep["disks"]["groups"] == 1
    assert rep["disks"]["allocated_bytes"] <= (before + distinct) * bs + MiB
    assert "does not ship" in m["note"] and "40 blocks" in m["note"]
