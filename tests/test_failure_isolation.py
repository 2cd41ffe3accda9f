"""No fault of the tracking state takes a datastore down: with the state
directory full, the VM's writes keep working through the mount, the disks
whose tracking could not be made durable say so (needs-full-sync, with the
reason), and once there is room again tracking resumes and the replicas
converge, compared byte for byte."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from mounthelpers import Mount
from sitehelpers import BS, MiB, NAME, Site

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(not Path("/dev/fuse").exists() or os.geteuid() != 0, reason="needs FUSE and root"),
]


def test_state_directory_full_keeps_the_vm_running(tmp_path, mount_factory, stack) -> None:
    site = Site(tmp_path, mount_factory, stack)
    state = site.src / ".vrfs" / "state"
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(state)], check=True)

    def unmount() -> None:
        if subprocess.run(["umount", str(state)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(state)], capture_output=True)
    stack.callback(unmount)
    site.serve()
    site.mount = mount_factory(site.src, site.mnt, "--peer", f"127.0.0.1:{site.server.port}", "--name", NAME,
                               "--rpo", "2s", env={"VRFS_CHECKPOINT_INTERVAL": "1s"})
    (site.mnt / "vm1").mkdir()
    with open(site.mnt / "vm1/a.raw", "wb") as f:
        f.write(os.urandom(8 * MiB))
    site.wait_converged("before the fault")

    filler = state / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\1" * 4096):
            pass
    except OSError:
        pass  # full
    finally:
        os.close(fd)
    # Writes to extents that are not hot need the activity log: it is full.
    with open(site.mnt / "vm1/a.raw", "r+b") as f:
        for k in range(0, 8 * MiB, 2 * MiB):
            f.seek(k + 100)
            f.write(b"written while the state directory is full")
        f.flush()
        os.fsync(f.fileno())
    site.wait("degraded tracking shown", lambda s: "No space left" in s["vm1/a.raw"].get("warning", ""),
                   timeout=30)
    log = site.mount.log()
    assert "tracking state cannot be made durable" in log or "checkpoint failed" in log, log
    assert isinstance(site.mount, Mount) and site.mount.proc.poll() is None  # the mount lives
    with open(site.mnt / "vm1/a.raw", "rb") as f:
        f.seek(100)
        assert f.read(41) == b"written while the state directory is full"
    with open(site.mnt / "vm1/a.raw", "r+b") as f:  # and takes more
        f.seek(5 * MiB)
        f.write(os.urandom(3 * BS))
    site.wait_converged("replicating while the state directory is full")

    filler.unlink()
    site.wait("tracking durable again", lambda s: "warning" not in s["vm1/a.raw"], timeout=30)
    deadline = time.monotonic() + 20
    while not list(state.glob("*.psf")):
        assert time.monotonic() < deadline, "tracking state was not written again"
        time.sleep(0.2)
    with open(site.mnt / "vm1/a.raw", "r+b") as f:
        f.seek(3 * BS)
        f.write(b"tracked again")
    site.wait_converged("tracking resumed")
