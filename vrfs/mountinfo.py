"""Finding the daemon of a running `vrfs mount`, for the commands that talk
to it (`status`, `umount`, `verify`). Nothing here imports the FUSE side, so
the DR site's commands and hosts without pyfuse3 can use it.

The daemon publishes its PID and control socket as extended attributes of
the mount's root. A daemon that stopped answering would leave getxattr
waiting in the kernel forever, so every question has a deadline."""

from __future__ import annotations

import errno
import os
import re
import threading

from vrfs.errors import UserError

CONTROL_XATTR = "user.vrfs.control"
PID_XATTR = "user.vrfs.pid"
ANSWER_TIMEOUT = 10.0


def mount_field(field: str) -> str:
    """A path as /proc/*/mounts and mountinfo write it: space, tab, newline
    and backslash come as octal escapes (\\040 for a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _proc_lines(name: str) -> list[str]:
    # surrogateescape: a mount point need not be UTF-8, and is compared as os.fsdecode gives it
    with open(name, encoding="utf-8", errors="surrogateescape") as f:
        return f.readlines()


def is_fuse_mount(path: str) -> bool:
    for line in _proc_lines("/proc/self/mounts"):
        fields = line.split()
        if len(fields) > 2 and mount_field(fields[1]) == path and fields[2].startswith("fuse"):
            return True
    return False


def _getxattr(mountpoint: str, name: str, timeout: float) -> bytes:
    """os.getxattr with a deadline (in a thread the process leaves behind if it hangs)."""
    result: list = []

    def ask() -> None:
        try:
            result.append(os.getxattr(mountpoint, name))
        except OSError as exc:
            result.append(exc)

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise UserError(f"{mountpoint}: the vrfs daemon does not answer within {timeout:g} s "
                        "(look at its log; `kill` its PID, then `fusermount3 -u` the mount)")
    if isinstance(result[0], OSError):
        raise result[0]
    return result[0]


def mount_pid(mountpoint: str, timeout: float = ANSWER_TIMEOUT) -> int:
    try:
        return int(_getxattr(mountpoint, PID_XATTR, timeout))
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise UserError(f"{mountpoint} is not a vrfs mount") from None
        if exc.errno == errno.ENOTCONN:
            raise UserError(f"{mountpoint}: the vrfs daemon is gone (crashed?); "
                            f"`fusermount3 -u {mountpoint}` removes the dead mount") from None
        raise UserError(f"{mountpoint}: {exc.strerror}") from None


def control_path_of(mountpoint: str, timeout: float = ANSWER_TIMEOUT) -> str:
    try:
        return os.fsdecode(_getxattr(mountpoint, CONTROL_XATTR, timeout))
    except OSError:
        mount_pid(mountpoint, timeout)  # raises the precise reason
        raise UserError(f"{mountpoint} is not a vrfs mount") from None


def mount_device(path: str) -> str | None:
    """The device ("major:minor") of the FUSE mount at ``path`` in our mount namespace."""
    for line in _proc_lines("/proc/self/mountinfo"):
        fields = line.split()
        if len(fields) > 4 and mount_field(fields[4]) == path:
            dash = fields.index("-") if "-" in fields else -1
            if dash > 0 and fields[dash + 1].startswith("fuse"):
                return fields[2]
    return None


def holders_elsewhere(device: str) -> list[tuple[int, str]]:
    """(pid, command) of one process in each other mount namespace where the
    mount of ``device`` still is: a copy made when that namespace was created
    (`ip netns exec`, `unshare -m`, a service with PrivateTmp, a hypervisor
    that runs each VM in a mount namespace of its own). While one exists,
    the kernel keeps the file system, and its daemon, alive."""
    try:
        ours = os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return []
    seen = {ours}
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry.name}/ns/mnt").st_ino
            if ns in seen:
                continue
            with open(f"/proc/{entry.name}/mountinfo") as f:
                held = any(line.split()[2] == device and " - fuse" in line for line in f)
            seen.add(ns)
            if held:
                with open(f"/proc/{entry.name}/comm") as f:
                    out.append((int(entry.name), f.read().strip()))
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return out
