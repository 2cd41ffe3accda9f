"""A packet delay line on a TUN device: the round trip of a WAN below TCP
(there is no `netem` on these machines).

    python tests/wandelay.py TUN_NAME DELAY_SECONDS [MAX_QUEUED_BYTES]

Creates the TUN device TUN_NAME (IFF_TUN | IFF_NO_PI: every read is one IP
packet, every write injects one) in the caller's network namespace, prints
"ready", then writes every packet it reads back into the same device DELAY
seconds after it arrived. The router namespace's policy routing sends the
packets of both sites into the device and routes what comes back out of it
by the main table (tests/wanhelpers.py), so each direction crosses the line
once and TCP at either end sees the delay in its own round trip.

One thread, no stop-and-wait: reading goes on while earlier packets wait,
in order (one delay for all, so FIFO is the schedule). A packet that would
make more than MAX_QUEUED_BYTES wait (default 64 MiB) is dropped, as a full
router queue would. Whoever started it ends it by its PID (SIGTERM); at
SIGTERM or SIGINT it prints what it carried to standard error, one line of
JSON: packets, bytes, drops, and how late packets left against their due
time (mean, 99th percentile and worst, in microseconds, over the latest
65536 packets).
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
READ_SIZE = 65536  # an IP packet is at most 65535 bytes
LATENESS_SAMPLES = 1 << 16  # a ring of the latest lateness figures, for the summary


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Stats:
    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.drops = 0
        self.late: collections.deque[float] = collections.deque(maxlen=LATENESS_SAMPLES)
        self.started = time.monotonic()

    def summary(self) -> str:
        """One line of JSON."""
        late = sorted(self.late) or [0.0]
        return json.dumps({
            "packets": self.packets, "bytes": self.bytes, "drops": self.drops,
            "seconds": round(time.monotonic() - self.started, 3),
            "late_mean_us": round(sum(late) / len(late) * 1e6), "late_p99_us":
            round(late[min(len(late) - 1, int(len(late) * 0.99))] * 1e6), "late_max_us": round(late[-1] * 1e6),
            "late_of_packets": len(self.late)})


def run(fd: int, delay: float, max_queued: int, stats: Stats) -> None:
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    queued = 0
    while True:
        if queue:
            timeout = max(0.0, queue[0][0] - time.monotonic())
            readable, _, _ = select.select([fd], [], [], timeout)
        else:
            readable, _, _ = select.select([fd], [], [])
        if readable:
            # Read what is waiting (a bounded number, so that due packets
            # are not held back by a flood); each is stamped as it is read.
            for _ in range(64):
                try:
                    packet = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    break
                if queued + len(packet) > max_queued:
                    stats.drops += 1
                    continue
                queue.append((time.monotonic() + delay, packet))
                queued += len(packet)
        while queue and queue[0][0] <= time.monotonic():
            due, packet = queue.popleft()
            queued -= len(packet)
            # When it leaves: what the write then costs is the stack's
            # forwarding past the line (tbf, the veth, the receiver's TCP).
            stats.late.append(time.monotonic() - due)
            try:
                os.write(fd, packet)
            except OSError:
                stats.drops += 1
                continue
            stats.packets += 1
            stats.bytes += len(packet)


def main() -> None:
    name, delay = sys.argv[1], float(sys.argv[2])
    max_queued = int(sys.argv[3]) if len(sys.argv) > 3 else 64 << 20
    fd = open_tun(name)
    # It sleeps in select() nearly all the time; a real-time priority lets it
    # leave on time when the sites keep both cores busy (best effort).
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except OSError:
        pass
    stats = Stats()

    def stop(signum: int, frame: object) -> None:
        print(stats.summary(), file=sys.stderr, flush=True)
        os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    run(fd, delay, max_queued, stats)


if __name__ == "__main__":
    main()
