"""A WAN test bed that the tests build themselves: the DR site in a network
namespace, joined to this one (the protected site) through a router
namespace where a packet delay line (tests/wandelay.py, on a TUN device)
adds the round trip and `tbf` limits the rate each way:

    root namespace          router namespace                     site namespace
    vrfs mount ── veth ═══ veth ─► tun: wandelay (RTT/2) ─► veth ═══ veth ── vrfs serve
                           (tbf)                            (tbf)

The delay is below TCP: both ends' TCP sees the whole round trip, so the
socket buffers and the sender's window are what a real long fat link asks
of them. A `Site` whose server runs in the site namespace listens on the
Wan's `theirs` address; the mount connects to it directly. What the source
sends on the wire is the router's egress towards the site (`tx_bytes`).

Everything is removed in cleanup (an ExitStack), whatever the test did:
helper processes ended by PID, namespaces and links deleted.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from servehelpers import in_netns
from sitehelpers import run

def netns(stack: ExitStack, tag: str, net: int = 201) -> tuple[str, str, str, str]:
    """A network namespace with a veth pair to it, 10.NET.X.1 here and
    10.NET.X.2 there (a /30); removed in cleanup. Returns (namespace, host
    side link, our address, its address)."""
    n = (os.getpid() + random.SystemRandom().randrange(1000)) % 250 + 1
    name, here, there = f"vrfs{net}n{n}{tag}", f"v{net}n{n}{tag}a", f"v{net}n{n}{tag}b"
    ours, theirs = f"10.{net}.{n}.1", f"10.{net}.{n}.2"

    def remove() -> None:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", here], capture_output=True)
    stack.callback(remove)
    run("ip", "netns", "add", name)
    run("ip", "link", "add", here, "type", "veth", "peer", "name", there)
    run("ip", "link", "set", there, "netns", name)
    run("ip", "addr", "add", f"{ours}/30", "dev", here)
    run("ip", "link", "set", here, "up")
    run("ip", "netns", "exec", name, "ip", "addr", "add", f"{theirs}/30", "dev", there)
    run("ip", "netns", "exec", name, "ip", "link", "set", there, "up")
    run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
    return name, here, ours, theirs


MTU = 65000  # every link of the path: few enough packets for a delay line in Python (docs/wan.md)
DELAY = Path(__file__).resolve().parent / "wandelay.py"


def shape(dev: str, mbit: float, ns: str | None = None, mtu: int = 1500, queue: float = 0.05) -> None:
    """`tbf` at MBIT megabits per second on DEV's egress (0: remove it), its
    queue holding QUEUE seconds of the rate (at least 4 packets)."""
    prefix = ["ip", "netns", "exec", ns] if ns else []
    if not mbit:
        subprocess.run(prefix + ["tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
        return
    rate = mbit * 1e6 / 8
    # The bucket must hold a whole frame, or tbf drops every frame larger than it.
    burst = max(64 << 10, mtu + 14, int(rate * 0.002))
    limit = max(4 * (mtu + 14), int(rate * queue))
    run(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
        "burst", str(burst), "limit", str(limit))


class DelayLine:
    """tests/wandelay.py in a namespace: a TUN device named TUN there whose
    packets come back DELAY seconds later; stopped by PID."""

    def __init__(self, ns: str, tun: str, delay: float) -> None:
        self.ns = ns
        self.summary = ""
        self.proc = subprocess.Popen([*in_netns(ns), sys.executable, str(DELAY), tun, str(delay)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"delay line did not start: {line!r} {self.summary}")

    def stop(self) -> None:
        """End it; what it carried (packets, bytes, drops, lateness) is then in `summary`."""
        if self.proc.poll() is None:
            end_process(self.proc)
            assert self.proc.stderr is not None
            self.summary = self.proc.stderr.read().decode(errors="replace").strip()

    def stats(self) -> dict:
        """What it carried (tests/wandelay.py): packets, bytes, drops, lateness; ends it."""
        self.stop()
        return json.loads(self.summary)

    def counters(self, dev: str) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of DEV in the delay line's namespace, read
        through /proc/PID/net/dev (cheap enough to sample often)."""
        for line in Path(f"/proc/{self.proc.pid}/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == dev:
                fields = rest.split()
                return int(fields[0]), int(fields[8])
        raise KeyError(dev)


@dataclass
class Wan:
    """Two sites joined through a router namespace that adds `rtt` seconds of
    round trip (a packet delay line) and limits each direction to `mbit`
    (0: unshaped) with `tbf`:

        root namespace (site A)     router namespace            site namespace (B)
        HERE 10.201.N.1/30 ═══ 10.201.N.2 [tun: RTT/2 each way] 10.201.N.5 ═══ 10.201.N.6/30 THERE
                                  tbf on both egress veths

    The site namespace is `ns`; a process there listens on `theirs` and the
    root namespace reaches it directly. Every link has the MTU `mtu`."""

    stack: ExitStack
    mbit: float
    rtt: float
    tag: str = "w"
    mtu: int = MTU
    queue: float = 0.05  # seconds of the rate the bottleneck's queue holds (a router's buffer)
    ns: str = ""
    router: str = ""
    here: str = ""
    ours: str = ""
    theirs: str = ""
    to_site: str = ""  # the router's egress towards the site: the bottleneck of what A sends
    to_root: str = ""  # the router's egress towards the root namespace
    delay: DelayLine | None = None

    def __post_init__(self) -> None:
        n = (os.getpid() + random.SystemRandom().randrange(1000)) % 250 + 1
        t = self.tag
        self.ns, self.router = f"vrfs201s{n}{t}", f"vrfs201r{n}{t}"
        self.here, self.to_root, self.to_site, there = (f"v201n{n}{t}{end}" for end in "arsb")
        self.ours, router_a, router_b, self.theirs = (f"10.201.{n}.{i}" for i in (1, 2, 5, 6))

        def remove() -> None:
            if self.delay:
                self.delay.stop()
            for ns in (self.ns, self.router):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            subprocess.run(["ip", "link", "del", self.here], capture_output=True)
        self.stack.callback(remove)
        r = ["ip", "netns", "exec", self.router]
        s = ["ip", "netns", "exec", self.ns]
        run("ip", "netns", "add", self.router)
        run("ip", "netns", "add", self.ns)
        run("ip", "link", "add", self.here, "mtu", str(self.mtu), "type", "veth", "peer", "name", self.to_root,
            "mtu", str(self.mtu), "netns", self.router)
        run(*r, "ip", "link", "add", self.to_site, "mtu", str(self.mtu), "type", "veth", "peer", "name", there,
            "mtu", str(self.mtu), "netns", self.ns)
        # Segmentation offloads stay on: the TUN device (no IFF_VNET_HDR)
        # announces no GSO, so the kernel cuts GSO packets to the MTU before
        # handing them over (docs/wan.md: the bytes per packet through the
        # line are the same with them off).
        run("ip", "addr", "add", f"{self.ours}/30", "dev", self.here)
        run("ip", "link", "set", self.here, "up")
        run(*r, "ip", "addr", "add", f"{router_a}/30", "dev", self.to_root)
        run(*r, "ip", "addr", "add", f"{router_b}/30", "dev", self.to_site)
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                    f"net.ipv4.conf.{self.to_root}.rp_filter=0", f"net.ipv4.conf.{self.to_site}.rp_filter=0"):
            run(*r, "sysctl", "-qw", key)
        for dev in ("lo", self.to_root, self.to_site):
            run(*r, "ip", "link", "set", dev, "up")
        run("ip", "route", "add", f"10.201.{n}.4/30", "via", router_a, "dev", self.here)
        run(*s, "ip", "addr", "add", f"{self.theirs}/30", "dev", there)
        run(*s, "ip", "link", "set", "lo", "up")
        run(*s, "ip", "link", "set", there, "up")
        run(*s, "ip", "route", "add", "default", "via", router_b)
        # Whatever arrives from either site goes into the delay line's TUN
        # device; what it writes back (iif tun) takes the main table and
        # leaves towards its destination.
        tun = "dl0"
        self.delay = DelayLine(self.router, tun, self.rtt / 2)
        run(*r, "sysctl", "-qw", f"net.ipv4.conf.{tun}.rp_filter=0")
        run(*r, "ip", "link", "set", tun, "mtu", str(self.mtu), "up")
        run(*r, "ip", "route", "add", "default", "dev", tun, "table", "100")
        for dev in (self.to_root, self.to_site):
            run(*r, "ip", "rule", "add", "iif", dev, "lookup", "100")
        for dev in (self.to_root, self.to_site):
            shape(dev, self.mbit, self.router, self.mtu, self.queue)

    def tx_bytes(self) -> int:
        """Bytes that went from the root namespace through the bottleneck
        towards the site (Ethernet frames, as `ip -s link` counts)."""
        assert self.delay
        return self.delay.counters(self.to_site)[1]

    def rx_bytes(self) -> int:
        """Bytes that came back over the link (answers, rsync's checksums, ACKs)."""
        assert self.delay
        return self.delay.counters(self.to_root)[1]

    def both(self) -> int:
        return self.tx_bytes() + self.rx_bytes()


class Sampler:
    """tx_bytes of a Wan every `interval` seconds in a thread, as (monotonic time, bytes)."""

    def __init__(self, wan: Wan, interval: float = 0.25) -> None:
        self.wan = wan
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.wan.tx_bytes()))
            self._stop.wait(self.interval)

    def active(self, threshold: float = 0.2e6) -> list[tuple[float, int]]:
        """The samples from the first to the last interval in which more than
        `threshold` bytes per second went out: the transfer, not the idle ends."""
        s = self.samples
        busy = [i for i in range(1, len(s)) if (s[i][1] - s[i - 1][1]) / (s[i][0] - s[i - 1][0]) > threshold]
        if not busy:
            return []
        return s[busy[0] - 1:busy[-1] + 1]

    def windows(self, seconds: float, start: float | None = None, end: float | None = None) -> list[float]:
        """Bytes per second over every window of `seconds` between start and end (monotonic)."""
        s = [x for x in self.samples if (start is None or x[0] >= start) and (end is None or x[0] <= end)]
        out = []
        j = 0
        for i in range(len(s)):
            while j < len(s) and s[j][0] - s[i][0] < seconds:
                j += 1
            if j == len(s):
                break
            out.append((s[j][1] - s[i][1]) / (s[j][0] - s[i][0]))
        return out

    def rate(self, start: float, end: float) -> float:
        """Bytes per second between two moments (nearest samples inside)."""
        inside = [x for x in self.samples if start <= x[0] <= end]
        (t0, b0), (t1, b1) = inside[0], inside[-1]
        return (b1 - b0) / (t1 - t0)


class RsyncDaemon:
    """`rsync --daemon` in the Wan's site namespace on its address, port PORT,
    module `dst` writing to DST; stopped by PID."""

    def __init__(self, wan: Wan, dst: Path, work: Path, port: int) -> None:
        conf = work / "rsyncd.conf"
        conf.write_text(f"use chroot = false\nlog file = {work / 'rsyncd.log'}\n"
                        f"[dst]\n  path = {dst}\n  read only = false\n  uid = root\n  gid = root\n")
        self.proc = subprocess.Popen([*in_netns(wan.ns), "rsync", "--daemon", "--no-detach",
                                      f"--config={conf}", f"--port={port}", f"--address={wan.theirs}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wan.stack.callback(self.stop)
        self.host = wan.theirs
        self.port = port
        deadline = time.monotonic() + 10
        while subprocess.run(["ip", "netns", "exec", wan.ns, "rsync", f"rsync://{wan.theirs}:{port}/"],
                             capture_output=True).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("rsync daemon did not start")
            time.sleep(0.1)

    def push(self, path: Path, *extra: str) -> float:
        """rsync PATH to the module over the Wan; returns the seconds it took."""
        started = time.monotonic()
        subprocess.run(["rsync", "--inplace", "--no-whole-file", "-I", *extra, str(path),
                        f"rsync://{self.host}:{self.port}/dst/{path.name}"], check=True, capture_output=True,
                       timeout=3600)
        return time.monotonic() - started

    def stop(self) -> None:
        end_process(self.proc)


def end_process(proc: subprocess.Popen) -> None:
    """SIGTERM by PID, SIGKILL if it does not go within 10 s."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
