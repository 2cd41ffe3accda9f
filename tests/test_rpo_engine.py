"""The RPO engine end to end, on a link held to 1 MB/s by --bwlimit: a change
rate the link carries keeps the lag under a 10 s RPO; a rate it cannot carry
is predicted before the first violation, in the log, in `vrfs status` and in
/metrics; the replica converges byte for byte once the burst ends."""

from __future__ import annotations

import os
import threading
import time

import pytest

from sitehelpers import NAME, Site
from servehelpers import free_port
from test_status_metrics import scrape, value

pytestmark = pytest.mark.timeout(180)
KiB, MiB = 1024, 1 << 20
RPO = 10.0
# Small enough that the burst's dirty data (at most the whole disk) drains at
# 1 MB/s in about 16 s, large enough that a cycle of it (16 s) breaks the RPO.
DISK_SIZE = 16 * MiB


class Writer(threading.Thread):
    """Random 64 KiB writes at a given rate (bytes/s) over a DISK_SIZE disk, fsynced every 16 writes."""

    def __init__(self, path, rate: float) -> None:
        super().__init__(daemon=True)
        self.path, self.rate = path, rate
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
            try:
                started, written = time.monotonic(), 0
                while not self.stop.is_set():
                    due = started + written / self.rate if self.rate else 0
                    if time.monotonic() < due:
                        time.sleep(min(0.05, due - time.monotonic()))
                        continue
                    block = int.from_bytes(os.urandom(2), "big") % (DISK_SIZE // (64 * KiB))
                    os.pwrite(fd, os.urandom(64 * KiB), block * 64 * KiB)
                    written += 64 * KiB
                    if written % (16 * 64 * KiB) == 0:
                        os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_rpo_held_then_breach_predicted_before_it_happens(tmp_path, mount_factory, stack) -> None:
    site = Site(tmp_path, mount_factory, stack).serve()
    metrics = free_port()
    site.mount = mount_factory(site.src, site.mnt, "--peer", f"127.0.0.1:{site.server.port}", "--name", NAME,
                               "--rpo", f"{RPO:g}s", "--bwlimit", "1MB/s", "--metrics", f"127.0.0.1:{metrics}")
    (site.mnt / "vm1").mkdir()
    disk = site.mnt / "vm1" / "d.raw"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    site.wait_converged("the empty disk", timeout=60)

    # 1. 300 KB/s of changes over a 1 MB/s link: every sample of the lag stays under the RPO.
    writer = Writer(disk, 300_000)
    writer.start()
    stack.callback(writer.stop.set)
    worst = 0.0
    deadline = time.monotonic() + 14  # three cycles at least (one per RPO/2)
    while time.monotonic() < deadline:
        d = site.status()["vm1/d.raw"]
        worst = max(worst, d["lag_seconds"])
        assert not d.get("rpo_violated"), d
        time.sleep(0.5)
    writer.stop.set()
    writer.join(10)
    assert writer.error is None, writer.error
    assert 0 < worst < RPO, worst
    assert "will be missed" not in site.mount.log()

    # 2. 3 MB/s: the link cannot carry it. The prediction comes first.
    burst = Writer(disk, 3_000_000)
    burst.start()
    stack.callback(burst.stop.set)
    started = time.monotonic()
    predicted_at = violated_at = None
    while time.monotonic() - started < 40 and violated_at is None:
        d = site.status()["vm1/d.raw"]
        if predicted_at is None and d.get("rpo_breach_predicted"):
            predicted_at = time.monotonic() - started
            assert value(scrape(metrics), "vrfs_rpo_breach_predicted", group="vm1") == 1
            assert "RPO will be missed" in d.get("prediction", ""), d
        if d.get("rpo_violated"):
            violated_at = time.monotonic() - started
        time.sleep(0.25)
    burst.stop.set()
    burst.join(10)
    assert burst.error is None, burst.error
    if violated_at is not None:  # status sees it at once; the log's RPO watch wakes at the group's deadline
        deadline = time.monotonic() + 5
        while "RPO violated" not in site.mount.log() and time.monotonic() < deadline:
            time.sleep(0.1)
    log = site.mount.log()
    assert predicted_at is not None, log[-3000:]
    assert violated_at is None or predicted_at < violated_at, (predicted_at, violated_at)
    assert log.count("vm1: RPO 10s will be missed") == 1, log[-3000:]
    if violated_at is not None:
        assert log.index("will be missed") < log.index("RPO violated")
    print(f"FIGURE lag under 300 KB/s: worst {worst:.1f} s (RPO {RPO:g} s); at 3 MB/s the breach was predicted "
          f"{predicted_at:.1f} s into the burst, violated "
          + (f"{violated_at:.1f} s" if violated_at is not None else "not within 40 s"))

    # 3. The burst over, everything arrives, byte for byte.
    site.wait_converged("after the burst", timeout=120)
