"""A WAN test bed that the tests build themselves: a network namespace joined
to this one by a veth pair, `tbf` on both ends for the rate, and a delaying
TCP relay (tests/wanrelay.py) in the namespace for the round trip.

    root namespace                          namespace vrfsw...
    vrfs mount ── veth (tbf) ═══════ veth (tbf) ── wanrelay (RTT/2 each way)
                  10.201.N.1/30      10.201.N.2/30    └─► 127.0.0.1:PORT vrfs serve

The relay listens on the namespace's veth address at the receiver's port, so
a `Site` whose server runs in the namespace on 127.0.0.1 needs only
``peer_host`` set. What the source sends on the wire is the root side's
``tx_bytes``. The relay splits the TCP connection: the source's TCP sees the
veth's round trip, the protocol sees the relay's (docs/wan.md).

Everything is removed in cleanup (an ExitStack), whatever the test did:
relays ended by PID, namespaces and links deleted.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from sitehelpers import run

RELAY = Path(__file__).resolve().parent / "wanrelay.py"


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


def shape(dev: str, mbit: float, ns: str | None = None) -> None:
    """`tbf` at MBIT megabits per second on DEV's egress (0: remove it)."""
    prefix = ["ip", "netns", "exec", ns] if ns else []
    if not mbit:
        subprocess.run(prefix + ["tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
        return
    burst = max(64 << 10, int(mbit * 1e6 / 8 * 0.002))  # 2 ms of the rate, at least a GSO packet
    run(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
        "burst", str(burst), "latency", "50ms")


class Relay:
    """tests/wanrelay.py in a namespace; stopped by PID."""

    def __init__(self, ns: str, listen: str, target: str, delay: float) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(RELAY), listen, target,
                                      str(delay)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"relay did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")

    def stop(self) -> None:
        end_process(self.proc)


@dataclass
class Wan:
    """A link of `mbit` (0: unshaped) with `rtt` seconds of round trip added by relays."""

    stack: ExitStack
    mbit: float
    rtt: float
    tag: str = "w"
    ns: str = ""
    here: str = ""
    ours: str = ""
    theirs: str = ""
    relays: list[Relay] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ns, self.here, self.ours, self.theirs = netns(self.stack, self.tag)
        shape(self.here, self.mbit)
        shape(self.here[:-1] + "b", self.mbit, self.ns)

    def relay(self, port: int, target_port: int | None = None) -> str:
        """Relay THEIRS:PORT to 127.0.0.1:TARGET_PORT (default PORT) in the
        namespace, RTT/2 each way; returns the address to connect to."""
        r = Relay(self.ns, f"{self.theirs}:{port}", f"127.0.0.1:{target_port or port}", self.rtt / 2)
        self.relays.append(r)
        self.stack.callback(r.stop)
        return self.theirs

    def tx_bytes(self) -> int:
        """Bytes sent from this namespace into the link (Ethernet frames, as `ip -s link` counts)."""
        return int(Path(f"/sys/class/net/{self.here}/statistics/tx_bytes").read_text())

    def rx_bytes(self) -> int:
        """Bytes that came back over the link (answers, rsync's checksums, ACKs)."""
        return int(Path(f"/sys/class/net/{self.here}/statistics/rx_bytes").read_text())

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
    """`rsync --daemon` in the Wan's namespace on 127.0.0.1:PORT, module `dst`
    writing to DST, reached through a relay; stopped by PID."""

    def __init__(self, wan: Wan, dst: Path, work: Path, port: int) -> None:
        conf = work / "rsyncd.conf"
        conf.write_text(f"use chroot = false\nlog file = {work / 'rsyncd.log'}\n"
                        f"[dst]\n  path = {dst}\n  read only = false\n  uid = root\n  gid = root\n")
        self.proc = subprocess.Popen(["ip", "netns", "exec", wan.ns, "rsync", "--daemon", "--no-detach",
                                      f"--config={conf}", f"--port={port}", "--address=127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wan.stack.callback(self.stop)
        self.host = wan.relay(port)
        self.port = port
        deadline = time.monotonic() + 10
        while subprocess.run(["ip", "netns", "exec", wan.ns, "rsync", f"rsync://127.0.0.1:{port}/"],
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
