"""Helpers for tests that run a real `vrfs serve` process and drive it over 127.0.0.1.

Processes are ended by their PID only; loop devices are detached in cleanup.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import xxhash

from vrfs.cycle import CycleHeader, DiskEntry
from vrfs.link import Link
from vrfs.tls import ClientTls
from tlshelpers import client_tls, serve_args

REPO = Path(__file__).resolve().parent.parent


def vrfs_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env.pop("VRFS_TEST_CRASH", None)
    env.update(extra or {})
    return env


def in_netns(name: str) -> list[str]:
    """The prefix that runs a long-lived command in network namespace NAME.
    Not `ip netns exec`, which also makes a mount namespace: made while a
    datastore is mounted, it holds a copy of that mount, and the kernel keeps
    the datastore's daemon alive after `vrfs umount` for as long as the
    command runs. nsenter execs the command itself: the PID is the command's."""
    return ["nsenter", f"--net=/run/netns/{name}", "--"]


def vrfs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vrfs", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `vrfs serve --foreground` process; its log is its standard error."""

    def __init__(self, store_url: str, log_path: Path, port: int | None = None, env: dict[str, str] | None = None):
        self.store_url = store_url
        self.log_path = log_path
        self.port = port or free_port()
        self.env = env or {}
        self.args: tuple[str, ...] = ()  # more options of vrfs serve
        self.insecure = False  # plain TCP: for tests of what the frame layer does with any bytes
        self.preexec: Callable[[], object] | None = None  # run in the child before exec (e.g. setrlimit)
        self.host = "127.0.0.1"  # the address it listens on (and a Site's mount connects to)
        self.netns: str | None = None  # run it inside this network namespace (in_netns)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Server:
        log = open(self.log_path, "ab")
        start_at = self.log_path.stat().st_size
        prefix = in_netns(self.netns) if self.netns else []
        self.proc = subprocess.Popen(
            prefix + vrfs_command("serve", "--foreground", "--listen", f"{self.host}:{self.port}",
                                  "--store", self.store_url, *self.args,
                                  *(["--insecure"] if self.insecure else serve_args(self.args))),
            stdout=log, stderr=log, env=vrfs_env(self.env), cwd=REPO, preexec_fn=self.preexec)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "serving " in self.log_path.read_text()[start_at:]:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"vrfs serve exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        raise RuntimeError(f"vrfs serve did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM by PID, then SIGKILL if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)

    def kill9(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@contextmanager
def running_server(store_url: str, log_path: Path, **kw: object) -> Iterator[Server]:
    server = Server(store_url, log_path, **kw)  # type: ignore[arg-type]
    try:
        yield server.start()
    finally:
        server.stop()


async def connect(server: Server, source: str = "hv1") -> Link:
    """A link as the source SOURCE: over TLS with that source's certificate, or
    plain TCP to an insecure server."""
    tls = ClientTls(None) if server.insecure else client_tls(source)
    return await Link.connect("127.0.0.1", server.port, source, tls=tls)


def disk(n: int, path: str, size: int, block_size: int = 65536) -> DiskEntry:
    return DiskEntry(disk_id=bytes([n]) * 16, path=path, size=size, block_size=block_size)


def header(group: str, cycle_id: int, *disks: DiskEntry) -> CycleHeader:
    return CycleHeader(group=group, cycle_id=cycle_id, cut_time=1_700_000_000.0 + cycle_id, disks=tuple(disks))


async def aiter_blocks(blocks: list[tuple[int, int, bytes | None]]) -> AsyncIterator[tuple[int, int, bytes | None]]:
    for b in blocks:
        yield b


class Model:
    """What the source's disks hold: bytearrays by path, for byte-for-byte comparison."""

    def __init__(self) -> None:
        self.files: dict[str, bytearray] = {}

    def write(self, path: str, offset: int, data: bytes) -> None:
        f = self.files[path]
        f[offset:offset + len(data)] = data

    def resize(self, path: str, size: int) -> None:
        f = self.files.setdefault(path, bytearray())
        if size < len(f):
            del f[size:]
        else:
            f.extend(bytes(size - len(f)))

    def block(self, path: str, index: int, block_size: int) -> bytes:
        return bytes(self.files[path][index * block_size:(index + 1) * block_size])


def tree_digest(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under root (store state included) with its size and content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "lock":
            out[str(p.relative_to(root))] = (p.stat().st_size, xxhash.xxh3_64_hexdigest(p.read_bytes()))
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = (0, "")
    return out


def losetup(backing: Path) -> str:
    return subprocess.run(["losetup", "-f", "--show", str(backing)], check=True, capture_output=True,
                          text=True).stdout.strip()


def losetup_detach(device: str) -> None:
    subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
