"""The benchmark scripts run end to end (slow: `pytest -m slow`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
JOB_NAMES = [
    f"{kind} {bs} {engine} {mode}"
    for kind, bs in (("seq-write", "1M"), ("seq-read", "1M"), ("rand-write", "4k"), ("rand-read", "4k"))
    for engine in ("psync qd1", "libaio qd16")
    for mode in ("buffered", "direct")
]


def _mounts() -> set[str]:
    with open("/proc/self/mounts") as f:
        return {line.split()[1] for line in f if "vrfs" in line}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("fio") is None or not os.path.exists("/dev/fuse"),
                    reason="needs root, fio and /dev/fuse")
def test_bench_datastore_quick(tmp_path: Path) -> None:
    before = _mounts()
    out = tmp_path / "bench.json"
    result = subprocess.run([str(REPO / "scripts" / "bench-datastore"), "--quick", "--dir",
                             str(tmp_path), "--json", str(out)],
                            capture_output=True, text=True, timeout=840, cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("job"))
    for target in ("plain", "bare", "vrfs"):
        assert target in lines[header]
    rows = [line for line in lines[header + 2:] if line.strip() and not line.startswith("goals")]
    assert [r[:34].strip() for r in rows] == JOB_NAMES
    for r in rows:
        numbers = r[34:].split()[:8]  # MB/s and IOPS of three targets, two ratios
        assert all(float(n) > 0 for n in numbers), r
    assert any(line.startswith("goals met:") for line in lines)

    data = json.loads(out.read_text())
    assert [r["job"] for r in data["rows"]] == JOB_NAMES
    for r in data["rows"]:
        assert set(r["results"]) == {"plain", "bare", "vrfs"}
        assert set(r["ratios"]) == {"vrfs/plain", "vrfs/bare"}
        assert "track" in r["goals"]

    # Everything it made is gone: no mount left behind, no temporary directory.
    assert _mounts() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_bench_verify_quick(tmp_path: Path) -> None:
    before = _mounts()
    out = tmp_path / "bench.json"
    result = subprocess.run([str(REPO / "scripts" / "bench-verify"), "--quick", "--dir", str(tmp_path),
                             "--json", str(out)], capture_output=True, text=True, timeout=280, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "bare xxh3-128 of one copy" in result.stdout and "verify / bare" in result.stdout
    data = json.loads(out.read_text())
    assert data["verify_MBps"] > 0 and data["bare_MBps"] > 0
    assert _mounts() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("rsync") is None or not os.path.exists("/dev/fuse"),
                    reason="needs root, rsync and /dev/fuse")
def test_bench_recovery_quick(tmp_path: Path) -> None:
    before = _mounts()
    out = tmp_path / "bench.json"
    result = subprocess.run([str(REPO / "scripts" / "bench-recovery"), "--quick", "--dir", str(tmp_path),
                             "--json", str(out)], capture_output=True, text=True, timeout=580, cwd=REPO)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert [r["case"] for r in data["reprotect"]] == ["vrfs", "checksum", "rsync -B64K"]
    vrfs_row = data["reprotect"][0]
    assert vrfs_row["wire"] <= 1.5 * vrfs_row["differing"], vrfs_row
    assert len(data["test_failover"]) == 2
    assert _mounts() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


@pytest.mark.slow
@pytest.mark.wan
@pytest.mark.timeout(300)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("rsync") is None or shutil.which("tc") is None
                    or not os.path.exists("/dev/fuse"), reason="needs root, tc, rsync and /dev/fuse")
def test_bench_wan_quick(tmp_path: Path) -> None:
    before = _mounts()
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    out = tmp_path / "bench.json"
    result = subprocess.run([str(REPO / "scripts" / "bench-wan"), "--quick", "--dir", str(tmp_path),
                             "--json", str(out)], capture_output=True, text=True, timeout=280, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "rsync wire" in result.stdout and "200Mbit" in result.stdout
    data = json.loads(out.read_text())
    [row] = data["rows"]
    assert row["initial_utilisation"] > 0.5 and row["vrfs_change_wire"] > row["change_bytes"] * 0.9
    assert row["vrfs_change_lag"] <= data["rpo_seconds"] + 5 and row["rsync_change_wire"] > 0
    # Everything it made is gone: mounts, namespaces, the temporary directory.
    assert _mounts() == before
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == namespaces
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")
def test_bench_scheduler_1000_disks_generous_bound(tmp_path: Path) -> None:
    """1,000 disks in 300 groups, writes going on, status and /metrics asked
    every second: the worst 4 KiB read stays under a generous 100 ms (the
    goal, 10 ms, is measured by the benchmark on a quiet machine:
    docs/bench-scheduler.txt), and cycles do run meanwhile."""
    before = _mounts()
    out = tmp_path / "bench.json"
    result = subprocess.run([str(REPO / "scripts" / "bench-scheduler"), "--reads", "1500", "--poll-status", "1",
                             "--json", str(out)], capture_output=True, text=True, timeout=880, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["vrfs"]["cycles"] > 0, data
    assert data["vrfs"]["max_ms"] < 100, data
    assert not [m for m in _mounts() - before if "bench-scheduler-" in m]  # its own mounts are gone
