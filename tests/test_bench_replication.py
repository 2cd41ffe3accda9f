"""scripts/bench-replication runs end to end (slow: `pytest -m slow`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CASES = ("initial", "seeded", "change")
TOOLS = ("vrfs", "rsync", "rsync -B64K")


def _mounts() -> set[str]:
    with open("/proc/self/mounts") as f:
        return {line.split()[1] for line in f if "vrfs" in line}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("rsync") is None or not os.path.exists("/dev/fuse"),
                    reason="needs root, rsync and /dev/fuse")
def test_bench_replication_quick(tmp_path: Path) -> None:
    before = _mounts()
    out = tmp_path / "bench.json"
    result = subprocess.run([str(REPO / "scripts" / "bench-replication"), "--quick", "--dir", str(tmp_path),
                             "--json", str(out)], capture_output=True, text=True, timeout=540, cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("case"))
    for column in ("wall s", "cpu s", "wire MB", "disk MB/s"):
        assert column in lines[header]
    rows = lines[header + 1:header + 1 + len(CASES) * len(TOOLS)]
    assert [(r[:9].strip(), r[10:22].strip()) for r in rows] == [(c, t) for c in CASES for t in TOOLS]
    for r in rows:
        wall, cpu, wire = (float(x) for x in r[22:].split()[:3])
        assert wall > 0 and cpu > 0 and wire > 0, r
    change_vrfs = next(r for r in rows if r.startswith("change") and "vrfs" in r)
    assert "cycle" in change_vrfs and "wait for cut" in change_vrfs
    for goal in ("change", "seeded", "initial"):
        assert any(re.match(rf"\s*\[\s*(MET|MISSED)\s*\] {goal} ", line) for line in lines), goal
    assert any(line.startswith("goals met:") for line in lines)

    data = json.loads(out.read_text())
    assert {(r["case"], r["tool"]) for r in data["rows"]} == {(c, t) for c in CASES for t in TOOLS}
    for r in data["rows"]:
        assert r["wall"] > 0 and r["cpu"] > 0 and r["wire"] > 0
    assert {(r["case"], r["against"]) for r in data["ratios"]} == {(c, t) for c in CASES for t in TOOLS[1:]}
    assert set(data["goals"]) == set(CASES)
    assert data["size"] == 256 << 20

    # Everything it made is gone: no mount, no temporary directory, no daemon.
    assert _mounts() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]
