"""The persistent state file (psf) of one disk: header and checkpointed bitmap.

Layout (little endian), the whole file covered by a trailing xxh3-64:

    magic "VRFSPSF1" | version u16 | flags u16 | disk_id 16s | block_size u32
    | extent_size u32 | generation u64 | last_ack_cycle u64 | ino u64 | size u64
    | ctime_ns u64 | al_generation u64 | bitmap_len u32 | path_len u16
    | reason_len u16 | path | reason | bitmap | xxh3_64(all before)

A state file is only ever replaced whole (vrfs.durable: temp file, fsync, rename, fsync of
the directory), so a crash leaves either the old or the new one; anything that
fails to parse or to verify is *corrupt* and makes its disk need a full sync.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import xxhash

MAGIC = b"VRFSPSF1"
VERSION = 1
FLAG_CLEAN = 1  # written at a clean shutdown: the bitmap is exact
FLAG_NEEDS_FULL_SYNC = 2

_HEAD = struct.Struct("<8sHH16sIIQQQQQQIHH")
_SUM = struct.Struct("<Q")


class CorruptStateFile(Exception):
    pass


@dataclass
class DiskState:
    disk_id: bytes
    path: str
    block_size: int
    extent_size: int
    ino: int = 0
    size: int = 0
    ctime_ns: int = 0
    generation: int = 0
    last_ack_cycle: int = 0
    al_generation: int = 0
    clean: bool = False
    needs_full_sync: bool = False
    reason: str = ""
    bitmap: bytes = field(default=b"", repr=False)

    def encode(self) -> bytes:
        path = self.path.encode("utf-8", "surrogateescape")
        reason = self.reason.encode("utf-8", "replace")[:1024]
        flags = (FLAG_CLEAN if self.clean else 0) | (FLAG_NEEDS_FULL_SYNC if self.needs_full_sync else 0)
        body = _HEAD.pack(
            MAGIC, VERSION, flags, self.disk_id, self.block_size, self.extent_size,
            self.generation, self.last_ack_cycle, self.ino, self.size, self.ctime_ns,
            self.al_generation, len(self.bitmap), len(path), len(reason),
        ) + path + reason + self.bitmap
        return body + _SUM.pack(xxhash.xxh3_64_intdigest(body))

    @classmethod
    def decode(cls, data: bytes) -> "DiskState":
        if len(data) < _HEAD.size + _SUM.size:
            raise CorruptStateFile(f"truncated ({len(data)} bytes)")
        body, (checksum,) = data[:-_SUM.size], _SUM.unpack(data[-_SUM.size:])
        if xxhash.xxh3_64_intdigest(body) != checksum:
            raise CorruptStateFile("checksum mismatch")
        (magic, version, flags, disk_id, block_size, extent_size, generation, last_ack,
         ino, size, ctime_ns, al_gen, bitmap_len, path_len, reason_len) = _HEAD.unpack_from(body)
        if magic != MAGIC:
            raise CorruptStateFile("bad magic")
        if version != VERSION:
            raise CorruptStateFile(f"unsupported format version {version}")
        if _HEAD.size + path_len + reason_len + bitmap_len != len(body):
            raise CorruptStateFile("lengths do not add up")
        pos = _HEAD.size
        path = body[pos:pos + path_len].decode("utf-8", "surrogateescape")
        pos += path_len
        reason = body[pos:pos + reason_len].decode("utf-8", "replace")
        pos += reason_len
        return cls(
            disk_id=disk_id, path=path, block_size=block_size, extent_size=extent_size,
            ino=ino, size=size, ctime_ns=ctime_ns, generation=generation,
            last_ack_cycle=last_ack, al_generation=al_gen, clean=bool(flags & FLAG_CLEAN),
            needs_full_sync=bool(flags & FLAG_NEEDS_FULL_SYNC), reason=reason,
            bitmap=bytes(body[pos:]),
        )


def read_state(dir_fd: int, name: str) -> DiskState:
    """Read and verify one state file; raises CorruptStateFile or OSError."""
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    return DiskState.decode(data)
