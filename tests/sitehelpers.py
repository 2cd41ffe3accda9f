"""A protected site and its DR site for end-to-end tests: a real `vrfs mount
--peer` and a real `vrfs serve` on 127.0.0.1, with byte-for-byte comparisons.
Processes are ended by PID and mounts removed by the fixtures that start them."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import zstandard

from servehelpers import Server, free_port

MiB = 1 << 20
BS = 64 << 10
NAME = "hv1"
RPO = "2s"


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60, **kw)


def sparse_sha(path: Path) -> str:
    """What sha() would tell apart, for a mostly sparse file, reading only its
    data: the size, and the offset and bytes of every non-zero 64 KiB block
    of its data extents (holes and zero blocks read as zeros either way)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        h.update(size.to_bytes(8, "little"))
        pos, hashed = 0, -BS
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole from here on
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            block = max(start - start % BS, hashed + BS)  # a block two extents share is hashed once
            while block < end:
                data = os.pread(fd, BS, block)
                if data.count(0) != len(data):
                    h.update(block.to_bytes(8, "little") + data)
                hashed = block
                block += BS
            pos = end
    return h.hexdigest()


def sha(path: Path, size: int | None = None) -> str:
    h = hashlib.sha256()
    left = size
    with open(path, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(4 * MiB if left is None else min(4 * MiB, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def tree(root: Path) -> dict[str, str]:
    """Regular files under root (the state directory excluded) with their content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] == ".vrfs" or not p.is_file():
            continue
        out[str(rel)] = f"{p.stat().st_size}:{sha(p)}"
    return out


def realistic(size: int, rng: random.Random) -> bytearray:
    """VM-like content: runs of 64 KiB–4 MiB of zeros, text and random bytes, a third each."""
    words = [rng.randbytes(rng.randrange(2, 10)).hex().encode() for _ in range(2000)]
    corpus = b" ".join(rng.choice(words) + (b"\n" if rng.random() < 0.1 else b"") for _ in range(400_000))
    out = bytearray(size)
    pos = 0
    while pos < size:
        n = min(rng.randrange(1, 65) * BS, size - pos)
        kind = rng.randrange(3)
        if kind == 1:
            out[pos:pos + n] = os.urandom(n)
        elif kind == 2:
            start = rng.randrange(len(corpus) - 1)
            text = corpus[start:] + corpus
            while len(text) < n:
                text += corpus
            out[pos:pos + n] = text[:n]
        pos += n
    return out


def compressed_nonzero(data: bytes | bytearray) -> int:
    """What a full sync of data should cost: its non-zero 64 KiB blocks, zstd level 1 in 2 MiB batches."""
    cctx = zstandard.ZstdCompressor(level=1)
    total, batch = 0, bytearray()
    view = memoryview(data)
    for off in range(0, len(data), BS):
        block = view[off:off + BS]
        if block.tobytes().count(0) != len(block):
            batch += block
        if len(batch) >= 2 * MiB:
            total += len(cctx.compress(bytes(batch)))
            batch.clear()
    if batch:
        total += len(cctx.compress(bytes(batch)))
    return total


class Site:
    """A source datastore mounted with --peer, and its receiver."""

    def __init__(self, tmp_path: Path, mount_factory, stack: ExitStack, store_url: str | None = None,
                 store: Path | None = None):
        self.tmp = tmp_path
        self.src = tmp_path / "src"
        self.mnt = tmp_path / "mnt"
        self.store = store or tmp_path / "store"
        self.src.mkdir()
        self.mnt.mkdir()
        self.store_url = store_url or f"dir:{self.store}"
        self.server = Server(self.store_url, tmp_path / "serve.log", port=free_port())
        stack.callback(self.server.stop)
        self._factory = mount_factory
        self.mount = None
        self.peer_host: str | None = None  # where the mount connects; None: the server's listen address
        self.rpo = RPO
        self.mount_env: dict[str, str] | None = None  # more environment for the mount's daemon
        self.mount_args: tuple[str, ...] = ()  # more options of vrfs mount

    def serve(self) -> "Site":
        self.server.start()
        return self

    def start_mount(self) -> "Site":
        host = self.peer_host or self.server.host
        self.mount = self._factory(self.src, self.mnt, "--peer", f"{host}:{self.server.port}",
                                   "--name", NAME, "--rpo", self.rpo, *self.mount_args,
                                   env=self.mount_env)
        return self

    def replica(self, path: str) -> Path:
        return self.store / NAME / path

    def status(self) -> dict[str, dict]:
        return {d["path"]: d for d in self.mount.status()}

    def wait(self, what: str, cond: Callable[[dict[str, dict]], bool], timeout: float = 40) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if cond(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} after {timeout}s: {json.dumps(st, indent=1)}\n"
                                     f"mount log:\n{self.mount.log()[-3000:]}\nserve log:\n"
                                     f"{self.server.log()[-2000:]}")
            time.sleep(0.1)

    def converged(self) -> bool:
        """The source's files, byte for byte, are the replicas, and status agrees."""
        st = self.status()
        want = tree(self.src)
        return (set(st) == set(want) and all(d["state"] == "in-sync" and not d["dirty_blocks"] for d in st.values())
                and tree(self.store / NAME) == want)

    def wait_converged(self, what: str, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        while not self.converged():
            if time.monotonic() > deadline:
                raise AssertionError(f"not converged ({what}) after {timeout}s:\nsource {tree(self.src)}\n"
                                     f"replica {tree(self.store / NAME)}\nstatus {json.dumps(self.status(), indent=1)}"
                                     f"\nmount log:\n{self.mount.log()[-3000:]}\nserve log:\n{self.server.log()[-3000:]}")
            time.sleep(0.2)

    def wait_in_sync(self, *paths: str, after: dict[str, int] | None = None, timeout: float = 40) -> dict[str, dict]:
        """Until every named disk is in sync (at a point newer than `after[path]`, if given)."""
        def ok(st: dict[str, dict]) -> bool:
            for p in paths:
                d = st.get(p)
                if d is None or d["state"] != "in-sync" or d["dirty_blocks"] or not d["last_point"]:
                    return False
                if after and d["last_point"]["id"] <= after.get(p, 0):
                    return False
            return True
        return self.wait(f"in sync: {paths}", ok, timeout)




def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def random_writes(path: Path, size: int, count: int, rng: random.Random) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)
        for _ in range(count):
            n = rng.randrange(1, 70_000)
            os.pwrite(fd, os.urandom(n), rng.randrange(0, size - n))
        os.fsync(fd)
    finally:
        os.close(fd)
