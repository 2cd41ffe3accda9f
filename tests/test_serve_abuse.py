"""The receiver holds under abuse: against a real `vrfs serve` on 127.0.0.1,
idle sockets by the hundred, connections past the bound, stalled cycles, a
peer staging under a 1 PiB disk, hostile JSON and a process out of file
descriptors neither stop a real source for longer than a short timeout nor
exhaust memory or disk nor flood the log (docs/receiver.md, *Limits*)."""

from __future__ import annotations

import json
import os
import random
import resource
import socket
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio

from vrfs import wire
from vrfs.link import LinkError
from vrfs.wire import MsgType

from servehelpers import Server, aiter_blocks, connect, disk, header
from sitehelpers import Site, random_writes

pytestmark = pytest.mark.timeout(60)
BS = 65536
DISK = disk(1, "vm1/a.raw", 4 * BS)
HELLO = wire.encode_frame(MsgType.HELLO, json.dumps({"source": "hv1"}).encode())


def figure(text: str) -> None:
    """Measured figures, shown with pytest -s (and kept in the test's output on failure)."""
    print(f"FIGURE {text}")


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise EOFError("closed")
            out += chunk
        return out
    _, _, ftype, _, length, _ = wire.FRAME_HEADER.unpack(exact(wire.FRAME_HEADER.size))
    return ftype, exact(length)


def session(port: int) -> socket.socket:
    """A peer that completes its handshake and then says nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(HELLO)
    assert read_frame(sock)[0] == MsgType.WELCOME
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """The receiver closed this socket (EOF or reset) within the time."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def is_closed(sock: socket.socket) -> bool:
    return closed_within(sock, 0.01)


def wait_for_log(server: Server, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{server.log()[-3000:]}"
        time.sleep(0.02)


def log_lines(server: Server, since: int = 0) -> list[str]:
    return server.log()[since:].splitlines()


async def ship(server: Server, cycle_id: int, group: str = "vm1") -> None:
    """A real source (vrfs.link) sends one cycle and waits for COMMITTED."""
    d = disk(1, f"{group}/a.raw", 4 * BS)
    link = await connect(server)
    try:
        await link.send_cycle(header(group, cycle_id, d), aiter_blocks([(0, cycle_id % 4, bytes([cycle_id]) * BS)]))
    finally:
        await link.aclose()


async def test_connection_bound(tmp_path: Path) -> None:
    server = Server(f"dir:{tmp_path / 'store'}", tmp_path / "serve.log")
    server.insecure = True  # the test speaks raw frames
    server.args = ("--max-connections", "4")
    with ExitStack() as stack:
        stack.callback(server.stop)
        server.start()
        sessions = [session(server.port) for _ in range(4)]
        for s in sessions:
            stack.callback(s.close)
        # Past the bound, with every place held by a session: closed at once, nothing read.
        started = time.monotonic()
        extra = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
        for s in extra:
            stack.callback(s.close)
        assert all(closed_within(s, 2) for s in extra)
        figure(f"20 connections past a bound of 4 closed in {time.monotonic() - started:.3f} s")
        with pytest.raises(LinkError):
            await connect(server)
        assert server.log().count("connection limit 4 reached") == 1
        # The bound clears once a quarter of it is free: one line, not one per connection.
        for s in sessions:
            s.close()
        wait_for_log(server, "connections below the limit again")
        await ship(server, 1)
        assert server.log().count("connections below the limit again") == 1

        # Connections still in their handshake give their place to a newcomer, oldest first.
        log_at = len(server.log())
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
        for s in idle:
            stack.callback(s.close)
        await trio.sleep(0.3)
        assert not any(is_closed(s) for s in idle)
        await ship(server, 2)
        assert closed_within(idle[0], 2) and not is_closed(idle[-1])
        assert server.log()[log_at:].count("connection limit 4 reached") == 1
        assert (tmp_path / "store/hv1/vm1/a.raw").read_bytes()[2 * BS:3 * BS] == bytes([2]) * BS
        assert len(log_lines(server)) < 20, server.log()


async def test_idle_session_gives_way_only_when_room_is_needed(tmp_path: Path) -> None:
    server = Server(f"dir:{tmp_path / 'store'}", tmp_path / "serve.log", env={"VRFS_SESSION_IDLE_TIMEOUT": "1"})
    server.insecure = True  # the test speaks raw frames
    server.args = ("--max-connections", "2")
    with ExitStack() as stack:
        stack.callback(server.stop)
        server.start()
        sessions = [session(server.port) for _ in range(2)]
        for s in sessions:
            stack.callback(s.close)
        # Sessions silent for less than the idle bound keep their place.
        late = socket.create_connection(("127.0.0.1", server.port))
        stack.callback(late.close)
        assert closed_within(late, 2)
        await trio.sleep(1.5)
        # Silent for longer: the one silent longest makes room for a source, the other stays.
        await ship(server, 1)
        assert closed_within(sessions[0], 2) and not is_closed(sessions[1])
        assert "closing a session silent for" in server.log()
        # Silence alone, with room to spare, cuts nobody (a quiet source is silent for hours).
        sessions[0].close()
        await trio.sleep(1.5)
        assert not is_closed(sessions[1])


async def test_handshake_and_cycle_timeouts(tmp_path: Path) -> None:
    server = Server(f"dir:{tmp_path / 'store'}", tmp_path / "serve.log",
                    env={"VRFS_HANDSHAKE_TIMEOUT": "1.5", "VRFS_CYCLE_IDLE_TIMEOUT": "2"})
    server.insecure = True  # the test speaks raw frames
    with ExitStack() as stack:
        stack.callback(server.stop)
        server.start()
        log_at = len(server.log())
        # 200 silent sockets: 64 hold a place until the handshake timeout, the others gave way at once.
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
        for s in idle:
            stack.callback(s.close)
        started = time.monotonic()
        assert all(closed_within(s, 5) for s in idle)
        figure(f"200 silent sockets all closed {time.monotonic() - started:.2f} s after they connected "
               "(handshake timeout 1.5 s)")
        lines = log_lines(server, log_at)
        figure(f"log lines for 200 silent sockets: {len(lines)}")
        assert "no handshake within 1.5 s" in server.log()
        assert len(lines) <= 15, lines  # 10 a minute for connections that never said HELLO, plus state changes

        # A source that stops in the middle of a cycle holds its group for VRFS_CYCLE_IDLE_TIMEOUT.
        await ship(server, 1)
        stalled = socket.create_connection(("127.0.0.1", server.port))
        stack.callback(stalled.close)
        stalled.sendall(HELLO)
        assert read_frame(stalled)[0] == MsgType.WELCOME
        stalled.sendall(wire.encode_frame(MsgType.CYCLE_BEGIN, wire.encode_control(
            wire.header_to_json(header("vm1", 2, DISK)))) + wire.encode_batch([(0, 0, b"S" * BS)], 1).frame)
        started = time.monotonic()
        assert closed_within(stalled, 6)
        figure(f"a cycle stalled after one batch was cut after {time.monotonic() - started:.2f} s (bound 2 s)")
        assert "nothing for 2 s inside a cycle" in server.log()
        await ship(server, 2)  # the group is free again
        assert not (tmp_path / "store/.vrfs/journal/hv1/vm1").exists()


@pytest.mark.timeout(120)
def test_slowloris_does_not_stop_a_real_source(tmp_path: Path, mount_factory, stack: ExitStack) -> None:
    site = Site(tmp_path, mount_factory, stack).serve()
    log_at = len(site.server.log())
    idle = [socket.create_connection(("127.0.0.1", site.server.port)) for _ in range(300)]
    for s in idle:
        stack.callback(s.close)
    wait_for_log(site.server, "connection limit 64 reached")
    time.sleep(0.5)
    held = sum(not is_closed(s) for s in idle)
    assert held == 64, held  # the bound holds; the others gave way to newer ones
    started = time.monotonic()
    site.start_mount()
    (site.mnt / "vm1").mkdir()
    random_writes(site.mnt / "vm1" / "a.raw", 8 << 20, 50, random.Random(1))
    site.wait_converged("during a slowloris of 300 sockets", timeout=30)
    took = time.monotonic() - started
    figure(f"mount started and 8 MiB disk converged in {took:.2f} s with 300 silent sockets open "
           f"(handshake timeout 30 s)")
    assert took < 25  # well inside the 30 s handshake timeout: the source did not wait for it
    lines = log_lines(site.server, log_at)
    figure(f"log lines during the slowloris: {len(lines)}")
    assert len(lines) < 15, lines


def test_staging_is_bounded_by_free_space_not_declared_sizes(tmp_path: Path, stack: ExitStack) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    stack.callback(subprocess.run, ["umount", "-l", str(small)], check=False)
    server = Server(f"dir:{small / 'store'}", tmp_path / "serve.log")
    server.insecure = True  # the test speaks raw frames
    stack.callback(server.stop)
    server.start()
    free_before = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize

    # A peer declares a 1 PiB disk and sends 4 MiB (raw) batches of it, 160 MiB in all:
    # cheap on the wire (they compress), dear in staging.
    huge = disk(9, "big/huge.raw", wire.MAX_DISK_SIZE)
    peer = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    stack.callback(peer.close)
    peer.sendall(HELLO)
    assert read_frame(peer)[0] == MsgType.WELCOME
    peer.sendall(wire.encode_frame(MsgType.CYCLE_BEGIN, wire.encode_control(
        wire.header_to_json(header("big", 1, huge)))))
    for n in range(40):
        blocks = [(0, n * 64 + i, bytes([n + 1]) * 8 + b"x" * (BS - 8)) for i in range(64)]
        peer.sendall(wire.encode_batch(blocks, 1).frame)
    peer.sendall(wire.encode_frame(MsgType.CYCLE_END, wire.encode_control({"blocks": 2560, "manifest": "0"})))
    ftype, payload = read_frame(peer)
    answer = json.loads(payload)
    assert ftype == MsgType.CYCLE_REFUSED and answer["group"] == "big", answer
    assert "free on the store's file system" in answer["message"], answer
    figure(f"1 PiB declared, 160 MiB sent: refused with {answer['message']!r}")
    # Its staging is gone, the connection goes on, and other groups are served.
    free_after = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
    assert free_after > free_before - (1 << 20), (free_before, free_after)
    assert not (small / "store/.vrfs/journal/hv1/big").exists()
    assert not (small / "store/hv1/big").exists()
    peer.sendall(wire.encode_frame(MsgType.HASHES_REQ, wire.encode_control(
        {"group": "vm1", "disk": wire.disk_to_json(DISK)})))
    assert read_frame(peer)[0] == MsgType.HASHES_END
    trio.run(ship, server, 1)
    assert "closing connection" not in server.log()


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_memory_per_connection_is_bounded(tmp_path: Path, stack: ExitStack) -> None:
    server = Server(f"dir:{tmp_path / 'store'}", tmp_path / "serve.log")
    server.insecure = True  # the test speaks raw frames
    stack.callback(server.stop)
    server.start()
    assert server.proc is not None
    before = _hwm_kib(server.proc.pid)
    # 16 peers at once, each with the largest frame it may send: a CYCLE_BEGIN
    # of 8 MiB of `{}` (200 MiB once parsed, if it were).
    n = (wire.MAX_CYCLE_BEGIN_PAYLOAD - 100) // 3
    bomb = wire.encode_frame(MsgType.CYCLE_BEGIN, b'{"group":"vm1","cycle_id":1,"cut_time":1,"disks":['
                             + b",".join([b"{}"] * n) + b"]}")
    peers = []
    for _ in range(16):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=20)
        stack.callback(s.close)
        s.sendall(HELLO + bomb)
        peers.append(s)
    for s in peers:  # each is refused; its socket is kept open (unread) meanwhile
        assert read_frame(s)[0] == MsgType.WELCOME
        ftype, payload = read_frame(s)
        assert ftype == MsgType.ERROR and b"values" in payload, payload[:200]
    grown = (_hwm_kib(server.proc.pid) - before) >> 10
    figure(f"16 peers with an 8 MiB CYCLE_BEGIN of empty objects: peak memory grew by {grown} MiB")
    assert grown < 16 * 8 * 4, grown  # the frame bound times a small constant, per connection
    assert "values" in server.log()


def _start_with_fd_limit(server: Server, limit: int) -> None:
    """Server.start, with RLIMIT_NOFILE lowered in the child."""
    server.preexec = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    server.start()


async def test_out_of_descriptors(tmp_path: Path) -> None:
    server = Server(f"dir:{tmp_path / 'store'}", tmp_path / "serve.log")
    # An explicit bound beyond what 64 descriptors allow: accept itself fails (EMFILE).
    server.args = ("--max-connections", "1000")
    idle: list[socket.socket] = []
    try:
        _start_with_fd_limit(server, 64)
        log_at = len(server.log())
        for _ in range(150):
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
        await trio.sleep(4)
        assert server.proc is not None and server.proc.poll() is None
        during = server.log()[log_at:]
        figure(f"4 s out of descriptors with 150 silent sockets: {len(during.splitlines())} log lines, "
               f"{len(during)} bytes")
        assert "cannot accept connections: Too many open files" in during
        assert len(during.splitlines()) <= 3 and len(during) < 2000, during
        for s in idle:
            s.close()
        started = time.monotonic()
        deadline = started + 20
        while True:  # a real source gets through once descriptors are free
            try:
                await ship(server, 1)
                break
            except LinkError:
                assert time.monotonic() < deadline, server.log()[-3000:]
                await trio.sleep(0.2)
        figure(f"a real source committed a cycle {time.monotonic() - started:.2f} s after the silent sockets closed")
        after = server.log()[log_at:]
        figure(f"whole episode: {len(after.splitlines())} log lines, {len(after)} bytes")
        assert after.count("accepting connections again") >= 1
        assert len(after.splitlines()) <= 20, after
    finally:
        for s in idle:
            s.close()
        server.stop()
