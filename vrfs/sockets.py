"""Socket options of the replication link, at both ends: buffers for the
bandwidth-delay product, how much unsent data the kernel queues, the
congestion control, and how soon a silent peer is given up (docs/wan.md).
Every option is best effort: a kernel without one still carries the link."""

from __future__ import annotations

import os
import socket
import struct

import trio

# Socket buffers hold the bandwidth-delay product (docs/wan.md): the rate
# (--bwlimit's peak, else UNLIMITED_RATE) times DESIGN_RTT, within
# [SOCKET_BUFFER, MAX_SOCKET_BUFFER]; VRFS_SOCKET_BUFFER (bytes) overrides.
# As root SO_SNDBUFFORCE/SO_RCVBUFFORCE pass net.core.wmem_max/rmem_max.
SOCKET_BUFFER = 4 << 20
MAX_SOCKET_BUFFER = 64 << 20
DESIGN_RTT = 0.25  # seconds: links up to this round trip stay full
UNLIMITED_RATE = 125e6  # bytes per second assumed without a limit: 1 Gbit/s
# Unsent bytes the kernel queues ahead of the wire (TCP_NOTSENT_LOWAT): the
# buffer above is for data in flight, not a queue that would hide the link's
# pace from the sender (or from --bwlimit's bucket). It must also not be too
# small: the socket turns writable when less than half of it is unsent, and
# a send that finds less than one segment unsent (with the congestion window
# open) marks the connection application-limited, a mark that BBR's bandwidth
# samples carry. BBR leaves STARTUP (pacing at 2.89 times the link) only on
# samples without it, so a sender that is never a segment ahead overflows the
# bottleneck for as long as it sends (docs/wan.md). With 2 MiB the sender is
# woken while 1 MiB still waits: 8 ms of a 1 Gbit/s link to fill it again.
NOTSENT_LOWAT = 2 << 20
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # Linux; not in Python's socket module
TCP_NOTSENT_LOWAT = 25
# A link that goes silent (a network partition, a peer host gone without a
# FIN or RST) must fail within this, not wait for an answer (link.REPLY_TIMEOUT): sent data left
# unacknowledged this long aborts the connection (TCP_USER_TIMEOUT), and an
# idle connection is probed by keepalive within it. The peer's kernel
# acknowledges while its vrfs is busy applying, so a slow apply is no failure.
LINK_TIMEOUT = float(os.environ.get("VRFS_LINK_TIMEOUT", "30"))


def buffer_for(rate: float | None) -> int:
    """Socket buffer bytes for a link of ``rate`` bytes per second (None: unknown)."""
    override = os.environ.get("VRFS_SOCKET_BUFFER")
    if override:
        return max(4096, int(override))
    return int(min(MAX_SOCKET_BUFFER, max(SOCKET_BUFFER, (rate or UNLIMITED_RATE) * DESIGN_RTT)))


def _set_buffer(sock: trio.socket.SocketType, opt: int, force: int, size: int) -> int:
    """Set a buffer, past the sysctl cap where allowed; returns what the kernel
    granted (getsockopt reports twice the usable size: it counts its bookkeeping)."""
    for o in (force, opt):
        try:
            sock.setsockopt(socket.SOL_SOCKET, o, size)
            break
        except OSError:
            continue
    try:
        return sock.getsockopt(socket.SOL_SOCKET, opt) // 2
    except OSError:
        return 0


def tune_socket(sock: trio.socket.SocketType, congestion: str | None,
                buffer: int | None = None) -> tuple[int, int]:
    """Best effort: buffers for the bandwidth-delay product, the chosen
    congestion control, keepalive. Returns the (send, receive) buffer sizes granted."""
    size = buffer or buffer_for(None)
    granted = (_set_buffer(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, size),
               _set_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, size))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass
    for name, value in (("TCP_USER_TIMEOUT", int(LINK_TIMEOUT * 1000)),
                        ("TCP_KEEPIDLE", max(1, int(LINK_TIMEOUT / 3))),
                        ("TCP_KEEPINTVL", max(1, int(LINK_TIMEOUT / 6))), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
            except OSError:
                pass
    if congestion and hasattr(socket, "TCP_CONGESTION"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
        except OSError:
            pass
    return granted


def keep_unsent(sock: trio.socket.SocketType) -> None:
    """Best effort: TCP_NOTSENT_LOWAT at NOTSENT_LOWAT. Call it after the
    socket is wrapped in a trio.SocketStream, whose constructor sets 16 KiB:
    with that, a send fits a segment or two, the sender is never a segment
    ahead of TCP, and BBR never leaves STARTUP."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
    except OSError:
        pass


def rtt_of(sock: trio.socket.SocketType) -> float | None:
    """The connection's smoothed round-trip time (TCP_INFO tcpi_rtt), seconds."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return struct.unpack_from("I", info, 68)[0] / 1e6
    except (OSError, struct.error, AttributeError):
        return None
