"""Finding the daemon of a running `vrfs mount`, for the commands that talk
to it (`status`, `umount`, `verify`). Nothing here imports the FUSE side, so
the DR site's commands and hosts without pyfuse3 can use it.

The daemon publishes its PID and control socket as extended attributes of
the mount's root. A daemon that stopped answering would leave getxattr
waiting in the kernel forever, so every question has a deadline."""

from __future__ import annotations

import errno
import os
import threading

from vrfs.errors import UserError

CONTROL_XATTR = "user.vrfs.control"
PID_XATTR = "user.vrfs.pid"
ANSWER_TIMEOUT = 10.0


def is_fuse_mount(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[1] == path and fields[2].startswith("fuse"):
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
