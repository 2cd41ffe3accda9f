"""The `user.vrfs.*` extended attributes of a disk, seen through the mount.

Settable (vrfs/settings.py): `user.vrfs.rpo`, `user.vrfs.compression`,
`user.vrfs.priority`; removing one returns the disk to the configuration
file's or the mount's value. Read-only, live: `user.vrfs.state`,
`user.vrfs.lag`, `user.vrfs.dirty_bytes`, `user.vrfs.last_point`,
`user.vrfs.rpo_breach_predicted`. A bad value is EINVAL and one log line;
writing a live value is EPERM.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from vrfs.settings import PARSERS, Settings, format_value
from vrfs.tracker import Disk

log = logging.getLogger("vrfs.settings")

PREFIX = "user.vrfs."
MAX_VALUE = 64  # bytes: "366d", "-100", "19" and some spaces
LIVE = ("state", "lag", "dirty_bytes", "last_point", "rpo_breach_predicted")


class XattrError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(errno.errorcode.get(code, str(code)))
        self.errno = code


class DiskAttributes:
    def __init__(self, settings: Settings, live: Callable[[Disk], dict[str, Any]] | None = None,
                 on_change: Callable[[Disk], None] | None = None,
                 checkpoint: Callable[[], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.live = live  # the shipper's view of a disk; None without --peer
        self.on_change = on_change  # a setting changed: the scheduler looks at the disk's group again
        # The tracker's checkpoint: it writes the state file of a disk that has
        # none yet, and a setting is kept by the identity that file holds.
        self.checkpoint = checkpoint
        self._lock = trio.Lock()

    def names(self) -> list[str]:
        return [PREFIX + k for k in PARSERS] + ([PREFIX + k for k in LIVE] if self.live else [])

    def get(self, disk: Disk, name: str) -> bytes:
        key = name[len(PREFIX):]
        if key in PARSERS:
            found = self.settings.for_disk(disk.disk_id, disk.path)
            return format_value(key, getattr(found, key)).encode()
        if key in LIVE and self.live is not None:
            info = self.live(disk)
            value = {"state": info.get("state"), "lag": f"{info.get('lag_seconds', 0):.1f}s",
                     "dirty_bytes": info.get("dirty_bytes", 0),
                     "last_point": (info.get("last_point") or {}).get("id", 0),
                     "rpo_breach_predicted": int(bool(info.get("rpo_breach_predicted")))}[key]
            return str(value).encode()
        raise XattrError(errno.ENODATA)

    async def set(self, disk: Disk, name: str, value: bytes) -> None:
        key = name[len(PREFIX):]
        if key in LIVE:
            log.warning("%s: %s is read-only (a live value)", disk.path, name)
            raise XattrError(errno.EPERM)
        try:
            if len(value) > MAX_VALUE:  # the reason quotes the value: no 64 KiB log lines
                raise ValueError(f"{len(value)} bytes; no value of a setting is longer than {MAX_VALUE}")
            text = value.decode("utf-8").strip().rstrip("\0")
            _, parsed = self.settings.staged_set(disk.disk_id, key, text)
        except (UnicodeDecodeError, ValueError) as exc:
            log.warning("%s: %s=%r refused: %s", disk.path, name, value[:MAX_VALUE], exc)
            raise XattrError(errno.EINVAL) from None
        await self._persist(disk, lambda: self.settings.staged_set(disk.disk_id, key, text)[0], identity=True)
        log.info("%s: %s set to %s", disk.path, key, format_value(key, parsed))

    async def remove(self, disk: Disk, name: str) -> None:
        key = name[len(PREFIX):]
        if key in LIVE:
            raise XattrError(errno.EPERM)
        if key not in PARSERS:
            raise XattrError(errno.ENODATA)
        await self._persist(disk, lambda: self.settings.staged_clear(disk.disk_id, key))
        log.info("%s: %s back to %s", disk.path, key, self.settings.for_disk(disk.disk_id, disk.path).where(key))

    async def _persist(self, disk: Disk, stage: Callable[[], dict[str, dict[str, Any]] | None],
                       identity: bool = False) -> None:
        """Written (fsync) in a worker thread, one change at a time, and in
        effect only once it is durable: the FUSE loop never waits on the disk.
        Each change is staged under the lock, on top of the one before it:
        staged earlier, two changes at once would each drop the other's.
        ``stage`` returning None: nothing to remove (ENODATA). With
        ``identity``, the disk's identity is made durable first: a disk created
        since the last checkpoint has no state file, and after a crash it
        would come back under a new identity, without its setting."""
        async with self._lock:
            overrides = stage()
            if overrides is None:
                raise XattrError(errno.ENODATA)
            try:
                if identity and self.checkpoint is not None:
                    await self.checkpoint()
                await trio.to_thread.run_sync(self.settings.persist, overrides)
            except OSError as exc:
                log.error("%s: cannot save the setting: %s", disk.path, exc.strerror or exc)
                raise XattrError(exc.errno or errno.EIO) from None
            self.settings.adopt(overrides)
        if self.on_change is not None:
            self.on_change(disk)
