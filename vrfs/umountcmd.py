"""`vrfs umount`: unmount a datastore and wait until its daemon has written
its final checkpoint and exited."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time

from vrfs.daemon import STACKS_SIGNAL
from vrfs.errors import UserError
from vrfs.mountinfo import holders_elsewhere, is_fuse_mount, mount_device, mount_pid
from vrfs.parse import parse_duration

# A daemon still running this long after its unmount may be kept alive by a
# copy of the mount in another mount namespace: look for one.
HOLDERS_AFTER = 1.0


def umount_main(args) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    timeout = parse_duration(args.timeout, "timeout")
    # /proc/self/mounts first: a stat of the mount would wait for its daemon, which may not answer.
    if not is_fuse_mount(mountpoint) and not os.path.isdir(mountpoint):
        raise UserError(f"{mountpoint} is not a directory")
    pid = mount_pid(mountpoint)
    device = mount_device(mountpoint)
    try:
        result = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        _ask_for_stacks(pid)
        raise UserError(f"fusermount3 -u {mountpoint} did not return within {args.timeout}: the vrfs daemon "
                        f"(pid {pid}) does not answer the kernel; the stacks of its threads are in its log. "
                        f"`fusermount3 -uz {mountpoint}` detaches the mount lazily") from None
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "unknown error"
        if "busy" in reason.lower():
            raise UserError(f"{mountpoint} is busy: files are still open on it (stop the VMs first)")
        raise UserError(f"cannot unmount {mountpoint}: {reason}")
    deadline = time.monotonic() + timeout
    look_elsewhere_at = time.monotonic() + HOLDERS_AFTER if device is not None else math.inf
    while _alive(pid):
        if time.monotonic() > look_elsewhere_at:
            look_elsewhere_at = math.inf
            assert device is not None
            holders = holders_elsewhere(device)
            if holders and not args.force:
                raise UserError(
                    f"unmounted {mountpoint} here, but its datastore is still mounted in other mount namespaces, "
                    f"held by {', '.join(f'pid {p} ({c})' for p, c in holders[:5])}"
                    f"{' and more' if len(holders) > 5 else ''}: the daemon (pid {pid}) goes on serving and "
                    f"tracking them, and finishes once they are unmounted or gone; `kill {pid}` (a clean "
                    "shutdown) ends it now, and so does `vrfs umount --force` next time; their files then fail "
                    "with ENOTCONN")
            if holders:
                os.kill(pid, signal.SIGTERM)  # the daemon ends its session: pyfuse3.terminate
        if time.monotonic() > deadline:
            _ask_for_stacks(pid)
            raise UserError(f"the vrfs daemon (pid {pid}) did not finish within {args.timeout}; the stacks of "
                            "its threads are in its log")
        time.sleep(0.05)
    return 0


def _ask_for_stacks(pid: int | None) -> None:
    """The daemon writes every thread's stack to its log (vrfs/daemon.py)."""
    if pid is not None and _alive(pid):
        try:
            os.kill(pid, STACKS_SIGNAL)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
