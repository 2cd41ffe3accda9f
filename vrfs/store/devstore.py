"""`dev:MAPFILE`: each disk's latest point is on a raw block device.

MAPFILE maps disks to devices, one per line (see docs/receiver.md):

    # SOURCE/PATH-IN-DATASTORE   DEVICE
    hv1/vm1/disk0.raw            /dev/vg0/vm1-disk0

State lives in MAPFILE.vrfs/. A device is taken as it is: its content counts
as the store's copy (a seed) until the first cycle of the disk arrives; the
source's full sync compares block hashes, so only differences travel. The map
is read again for every cycle, so a mapping can be added without a restart.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from pathlib import Path

from vrfs.cycle import BadPath, CycleHeader, DiskEntry, check_path
from vrfs.store.base import Copy, GroupState, Refusal, Store, StoreError, adoptions, write_all
from vrfs.store.points import copy_prefix
from vrfs.wire import ProtocolError, check_name

BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a range, offloaded to the device where it can be
COPY_CHUNK = 4 << 20


def parse_map(text: str, origin: str) -> dict[tuple[str, str], Path]:
    """{(source, path): device} from the map file's text."""
    out: dict[tuple[str, str], Path] = {}
    devices: set[Path] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{origin}:{lineno}"
        if len(fields) != 2:
            raise StoreError(f"{where}: expected 'SOURCE/PATH DEVICE'")
        name, device = fields
        source, _, path = name.partition("/")
        try:
            check_name(source, "source name")
            check_path(path)
        except (ProtocolError, BadPath) as exc:
            raise StoreError(f"{where}: {exc}") from None
        if not device.startswith("/"):
            raise StoreError(f"{where}: device {device!r} is not an absolute path")
        dev = Path(device)
        if (source, path) in out or dev in devices:
            raise StoreError(f"{where}: {name} or {device} is mapped twice")
        out[(source, path)] = dev
        devices.add(dev)
    return out


def device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


class DevStore(Store):
    def __init__(self, url: str, mapfile: Path):
        super().__init__(url, Path(f"{mapfile}.vrfs"))
        self.mapfile = mapfile
        self.map: dict[tuple[str, str], Path] = {}

    def read_map(self) -> dict[tuple[str, str], Path]:
        try:
            text = self.mapfile.read_text()
        except OSError as exc:
            raise StoreError(f"cannot read device map {self.mapfile}: {exc.strerror or exc}") from None
        self.map = parse_map(text, str(self.mapfile))
        return self.map

    def open(self) -> None:
        self.read_map()
        super().open()

    def device(self, source: str, path: str) -> Path:
        try:
            return self.map[(source, path)]
        except KeyError:
            raise StoreError(f"{source}/{path} has no device in {self.mapfile}") from None

    def check_cycle(self, source: str, header: CycleHeader, old: GroupState | None) -> None:
        self.read_map()  # before the integrity checks, which look devices up
        super().check_cycle(source, header, old)

    def check_backend(self, source: str, header: CycleHeader, old: GroupState | None) -> None:
        written = set()
        for disk in header.disks:
            dev = self.device(source, disk.path)
            written.add(dev)
            try:
                fd = os.open(dev, os.O_RDONLY)
            except OSError as exc:
                raise StoreError(f"cannot open {dev} for {source}/{disk.path}: {exc.strerror}") from None
            try:
                mode = os.fstat(fd).st_mode
                size = device_size(fd)
            finally:
                os.close(fd)
            if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
                raise StoreError(f"{dev} is not a block device")
            if disk.size > size:
                raise StoreError(f"{source}/{disk.path} is {disk.size} bytes, larger than {dev} ({size} bytes)")
        # A rename copies the old device to the new one during apply, before
        # any block of the cycle is written, and a redo never copies again
        # (the journal's moved-in marker). Copies among renames themselves
        # would depend on their order (a chain) or overwrite each other (a
        # swap): such a cycle is refused.
        old_by_id = old.by_id() if old else {}
        destinations = {}
        for disk in header.disks:
            before = old_by_id.get(disk.disk_id)
            if before and before.path != disk.path:
                src, dst = self.map.get((source, before.path)), self.device(source, disk.path)
                if src is not None and src != dst:
                    destinations[dst] = (before.path, disk.path, src)
        for old_path, new_path, src in destinations.values():
            if src in destinations:
                raise StoreError(f"rename of {old_path} to {new_path}: {src} is also the target of another "
                                 "rename in the same cycle; a device store cannot rename in a chain or swap")
        # A new disk starts from the device its full sync compared with; on a
        # device store that is only possible where both are the same device.
        resync = {}
        for old_id, heir in adoptions(header, old_by_id).items():
            base = self.map.get((source, old_by_id[old_id].path))
            if base != self.device(source, heir.path):
                resync[heir.disk_id] = f"{heir.path}: compared with the device of another path"
        if resync:
            raise Refusal("; ".join(resync.values()) + ": a full sync is needed", resync)

    # --- integrity -----------------------------------------------------------

    def _device_size(self, dev: Path) -> int | None:
        try:
            fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return device_size(fd)
        finally:
            os.close(fd)

    def replica_damage(self, source: str, disk: DiskEntry) -> str | None:
        dev = self.map.get((source, disk.path))
        if dev is None:
            return "has no device in the map"
        size = self._device_size(dev)
        if size is None:
            return f"device {dev} cannot be opened"
        if size < disk.size:
            return f"device {dev} is smaller ({size} bytes) than the disk ({disk.size} bytes)"
        return None

    def occupied(self, source: str, path: str) -> bool:
        return False  # a device is taken as it is (see the module's docstring)

    def fingerprint(self, source: str, path: str) -> str | None:
        # A device's content has no cheap fingerprint; what changes it is only
        # this store, one cycle of the group at a time. Its identity is what
        # the source compared with.
        dev = self.map.get((source, path))
        if dev is None:
            return None
        size = self._device_size(dev)
        return None if size is None else f"{dev}.{size}"

    def open_copy_at(self, source: str, disk: DiskEntry, known: DiskEntry | None) -> Copy | None:
        dev = self.map.get((source, known.path if known else disk.path))
        if dev is None:
            return None
        try:
            fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        dsize = device_size(fd)
        size = min(known.size if known else disk.size, dsize)
        fingerprint = f"{dev}.{dsize}"
        basis = f"disk:{known.disk_id.hex()}:{fingerprint}" if known else f"seed:{fingerprint}"
        return Copy(fd, size, sparse=False, basis=basis)

    # --- apply ---------------------------------------------------------------

    def move_out(self, source: str, header: CycleHeader, old: dict[bytes, DiskEntry], limbo: Path,
                 adopted: dict[bytes, DiskEntry], retain_in: Path | None) -> None:
        # Devices stay where they are; a deleted disk's device is simply no
        # longer used. A new disk that adopts an old disk's replica has it
        # already: both are the device of the same path. An older point keeps
        # a deleted disk whole: a copy, since another disk may take the
        # device (a redo copies again; nothing of the cycle is written yet).
        if retain_in is None:
            return
        new = {d.disk_id for d in header.disks}
        for disk_id, entry in old.items():
            dev = self.map.get((source, entry.path))
            if disk_id not in new and dev is not None and not self.points.is_lost(retain_in, disk_id):
                self.points.keep_whole(retain_in, disk_id, dev, entry, move=False)

    # --- points ----------------------------------------------------------------

    def replica_path(self, source: str, path: str) -> Path:
        # The map is the operator's: a device named by a symlink (/dev/vg0/x)
        # is read through what it names.
        return Path(os.path.realpath(self.device(source, path)))

    def copy_replica(self, source: str, disk: DiskEntry, dest: Path) -> None:
        # A device holds the disk in its first disk.size bytes; the rest is not the disk's.
        copy_prefix(self.replica_path(source, disk.path), dest, disk.size)

    def move_in(self, source: str, header: CycleHeader, old: dict[bytes, DiskEntry], limbo: Path) -> None:
        for disk in header.disks:
            before = old.get(disk.disk_id)
            if before is None or before.path == disk.path:
                continue
            src = self.map.get((source, before.path))
            dst = self.device(source, disk.path)
            if src is not None and src != dst:
                self._copy(src, dst, min(before.size, disk.size))

    def _copy(self, src: Path, dst: Path, size: int) -> None:
        sfd = os.open(src, os.O_RDONLY)
        try:
            dfd = os.open(dst, os.O_WRONLY)
            try:
                offset = 0
                while offset < size:
                    data = os.pread(sfd, min(COPY_CHUNK, size - offset), offset)
                    if not data:
                        break
                    write_all(dfd, data, offset)
                    offset += len(data)
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    def open_for_apply(self, source: str, disk: DiskEntry, old: DiskEntry | None, fresh: bool) -> int:
        dev = self.device(source, disk.path)
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        try:
            if device_size(fd) < disk.size:
                raise OSError(errno.ENOSPC, f"{dev} is smaller than the disk ({disk.size} bytes)")
            if fresh:
                self.zero(fd, 0, disk.size)  # its full sync found no copy: the disk starts as zeros
            elif old is not None and disk.size > old.size:
                # A file that grows reads as zeros past its old end; so must the device.
                self.zero(fd, old.size, disk.size - old.size)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def zero(self, fd: int, offset: int, length: int) -> None:
        if offset % 512 == 0 and length % 512 == 0 and length:
            try:
                fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
                return
            except OSError:
                pass  # not a block device, or no support: write zeros
        chunk = bytes(min(length, COPY_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            write_all(fd, chunk[:n], offset)
            offset += n
