"""The `vrfs` command line: argument parsing and one-line errors, nothing more.

Each subcommand hands its parsed arguments to the module that does the work.
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
from typing import NoReturn

from vrfs import DEFAULT_PORT, __version__
from vrfs.trust import DEFAULT_DAYS, DEFAULT_TLS_DIR
from vrfs.errors import EXIT_USAGE, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like every other bad input
        # main() prints the "vrfs: " in front; a subcommand's name stays ("mount: ...").
        where = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        raise UserError(f"{where}{message} (see --help)", EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{value} is outside 1..1000000")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vrfs",
        description="Replicate virtual machine disk images to a disaster-recovery site.",
        epilog="Protected site: `vrfs mount`. DR site: `vrfs serve`. Both: `vrfs status`.",
    )
    p.add_argument("--version", action="version", version=f"vrfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    m = sub.add_parser(
        "mount",
        help="serve a datastore directory through FUSE, tracking and replicating its disks",
        description=(
            "Serve SOURCE through FUSE at MOUNTPOINT (or over SOURCE itself), tracking every "
            "changed block of every file. With --peer, ship the changes to a `vrfs serve` "
            "receiver at the DR site. Returns once the mount is ready; the daemon keeps running "
            "until `vrfs umount`, SIGTERM or SIGINT."
        ),
    )
    m.add_argument("source", metavar="SOURCE", help="directory holding the disk images")
    m.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?",
                   help="empty directory to mount at (default: mount over SOURCE)")
    m.add_argument("--peer", metavar="HOST:PORT",
                   help=f"DR-site receiver to replicate to (port defaults to {DEFAULT_PORT})")
    m.add_argument("--name", metavar="NAME",
                   help="name of this source at the DR site (default: the host name)")
    m.add_argument("--rpo", metavar="DURATION", default="5m",
                   help="recovery point objective of every disk, e.g. 30s, 5m, 1h: from 1s to 366d (default: 5m)")
    m.add_argument("--config", metavar="FILE",
                   help="per-disk settings (RPO, compression, priority) by globs over datastore paths, in TOML "
                        "(see docs/settings.md); `setfattr -n user.vrfs.rpo -v 30s DISK` through the mount "
                        "overrides them for one disk")
    m.add_argument("--block-size", metavar="SIZE",
                   help="tracking granularity, a power of two from 4K to 1M (default: 64K, or what "
                        "the datastore already uses); "
                        "fixed for a datastore once its state exists")
    m.add_argument("--compress-level", metavar="N", type=int, default=1,
                   help="the hardest zstd level for shipped blocks, 1-19 (default: 1): each batch goes "
                        "raw or at the level that the measured link and compression rates favour, up to this")
    m.add_argument("--congestion", choices=("cubic", "bbr", "reno"), default="cubic",
                   help="TCP congestion control of the link (default: cubic; bbr suits long fat links)")
    m.add_argument("--bwlimit", metavar="RATE|SCHEDULE",
                   help="limit what the link to the DR site sends, TLS and TCP/IP headers included, e.g. "
                        "50Mbit (50 million bits per second) or 6MB/s (6 million bytes per second), or by "
                        "local time of day, e.g. \"08:00-18:00=50Mbit,*=0\" (ranges HH:MM-HH:MM may wrap "
                        "midnight; * is the rest of the day; 0 means no limit). Units are powers of 1000 "
                        "and required (default: no limit; see docs/wan.md)")
    m.add_argument("--force", action="store_true",
                   help="mount even though other processes hold files of SOURCE open for writing "
                        "(a VM started before the mount); their writes will not be tracked and "
                        "the replicas of those files can differ from the source without a sign")
    m.add_argument("--verify-every", metavar="DURATION",
                   help="verify every replica against the source this often, e.g. 7d, and repair what "
                        "differs (default: off; `vrfs verify` runs one now)")
    _metrics(m, "lag, RPO, dirty bytes, bytes sent and cycles per group")
    _link_security(m, "the source")
    m.add_argument("--foreground", "-f", action="store_true",
                   help="stay in the foreground and log to standard error")
    m.add_argument("--no-tracking", action="store_true",
                   help="bare passthrough without change tracking (for benchmarks only)")
    m.add_argument("--no-writeback-cache", action="store_true",
                   help="disable the kernel's writeback cache (see docs/datastore.md)")
    m.add_argument("--log", metavar="FILE",
                   help="log file of the background daemon (default: SOURCE/.vrfs/mount.log)")
    m.add_argument("--debug", action="store_true", help="log every request")

    u = sub.add_parser("umount", help="shut a datastore down cleanly",
                       description="Unmount MOUNTPOINT, let its daemon write its final checkpoint, "
                                   "and return when the mount is gone.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("--timeout", metavar="DURATION", default="60s",
                   help="how long to wait for the daemon to finish (default: 60s)")
    u.add_argument("--force", action="store_true",
                   help="end the daemon even while copies of the mount in other mount namespaces (made by "
                        "ip netns exec, unshare, a service's PrivateTmp, a hypervisor's per-VM namespace) still "
                        "use it; without it, vrfs umount names them and leaves the daemon serving them")

    s = sub.add_parser("status", help="show the state of every disk",
                       description="At the protected site: the disks of a mounted datastore. "
                                   "At the DR site (--store): the replicated disks in a store.")
    s.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    s.add_argument("--store", metavar="URL", help="a DR-site store, e.g. dir:/srv/replicas")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--blocks", action="store_true",
                   help="also list the dirty block ranges of each disk (with --json)")
    s.add_argument("--watch", "-w", action="store_true", help="redraw the table until Ctrl-C")
    s.add_argument("--interval", metavar="DURATION", default="2s",
                   help="time between redraws with --watch, at least 0.2s (default: 2s)")

    v = sub.add_parser(
        "verify", help="prove that the DR site holds exactly what the source held at its newest point",
        description=(
            "Compare, block by block (xxh3-128), the replicas at the DR site with the source's disks "
            "as of each group's newest point, while the VMs keep running and replication goes on. "
            "Blocks written since that point are skipped: the next cycle carries them. Exit status: "
            "0 when every replica verifies, 1 when something differs, 2 when it could not check. "
            "Interrupted (Ctrl-C, or a restart of the mount), the same command resumes where it stopped."),
    )
    v.add_argument("mountpoint", metavar="MOUNTPOINT")
    v.add_argument("groups", metavar="GROUP", nargs="*", help="groups (VM directories) to verify (default: all)")
    v.add_argument("--repair", action="store_true",
                   help="ship the correct blocks of every differing one, as an ordinary consistent cycle, "
                        "and wait until the repair is acknowledged")
    v.add_argument("--rate", metavar="SIZE", default="100M",
                   help="source data read per second, e.g. 100M, 1G; 0 for no limit (default: 100M)")
    v.add_argument("--json", action="store_true", help="machine-readable result")
    v.add_argument("--wait", metavar="DURATION", default="2m",
                   help="give up (exit 2) when no progress is made this long, e.g. the link is down "
                        "(default: 2m)")

    pl = sub.add_parser(
        "plan", help="the bandwidth an RPO needs, whether a link holds it, how long the initial sync takes",
        description="From the disks, their change rate (given, or measured on a running mount), the RPOs and "
                    "a compression ratio: the data each cycle carries, the bandwidth it needs, whether --link "
                    "holds each RPO, the shortest RPO it holds, and the initial sync time. A cycle carries "
                    "RPO/2 of changes and must be committed within the next RPO/2 (docs/plan.md). Sizes are "
                    "binary (1M = 1 MiB), bit rates decimal (1 Mbit/s = 10^6 bit/s).")
    pl.add_argument("--disk", metavar="SIZE", action="append",
                    help="a disk's allocated size, e.g. 100G; repeatable")
    pl.add_argument("--disks", metavar="N", help="N disks of --size SIZE (besides any --disk)")
    pl.add_argument("--size", metavar="SIZE", help="the size of each of --disks N")
    rate = pl.add_mutually_exclusive_group()
    rate.add_argument("--change-rate", metavar="RATE",
                      help="changed blocks per time over all disks: 5M/s, 40G/d (bytes, binary), 20Mbit/s, "
                           "or 2%%/h of the disks' size; an upper bound: rewrites count each time")
    rate.add_argument("--measure", metavar="MOUNTPOINT",
                      help="measure the change rate of a running `vrfs mount` (distinct blocks per cycle), "
                           "its disks (unless given) and, if it ships, its compression ratio")
    pl.add_argument("--for", dest="measure_for", metavar="DURATION",
                    help="sampling time of --measure (default: 60s)")
    pl.add_argument("--rpo", metavar="DURATION", action="append",
                    help="an RPO, or a list: 30s,5m,1h; repeatable (default: 30s,1m,5m,15m,1h)")
    pl.add_argument("--link", metavar="RATE", help="the link to the DR site, e.g. 100Mbit/s, 1Gbps, 50M/s")
    pl.add_argument("--compression", metavar="RATIO",
                    help="data / bytes on the wire, e.g. 2 or 3:1 (default: measured with --measure on a "
                         "replicating mount, else 2)")
    pl.add_argument("--rtt", metavar="TIME", help="round-trip time of the link, e.g. 40ms (default: 0)")
    pl.add_argument("--json", action="store_true", help="machine-readable output")

    pts = sub.add_parser("points", help="list the points in time a DR-site store holds",
                         description="Per group of a store: its points (id, cut time, size, disks). "
                                     "Works whether or not `vrfs serve` runs on the store.")
    pts.add_argument("group", metavar="SOURCE/GROUP", nargs="?", help="one group (default: all)")
    pts.add_argument("--store", metavar="URL", required=True, help="the store, e.g. dir:/srv/replicas")
    pts.add_argument("--json", action="store_true", help="machine-readable output")

    tf = sub.add_parser(
        "test-failover", help="writable images of a group's point, while replication goes on",
        description="Put writable images of every disk of SOURCE/GROUP, as of a point, under DIR/GROUP/... "
                    "(the same relative paths as in the source datastore). The point and the replication "
                    "of the group are not changed by what the test VM writes. `--cleanup DIR` removes "
                    "them. Works whether or not `vrfs serve` runs on the store.")
    tf.add_argument("group", metavar="SOURCE/GROUP", nargs="?")
    tf.add_argument("--store", metavar="URL", help="the store, e.g. dir:/srv/replicas")
    tf.add_argument("--point", metavar="ID", type=int, help="the point (default: the newest)")
    tf.add_argument("--to", metavar="DIR", help="where the images go: a new or empty directory")
    tf.add_argument("--format", choices=("qcow2", "raw"), default="qcow2",
                    help="qcow2: an overlay on a read-only copy of the point (default); raw: sparse copies")
    tf.add_argument("--cleanup", metavar="DIR", help="remove the test failover in DIR")

    fo = sub.add_parser(
        "failover", help="fence a group and hand its images to the hypervisor",
        description="Fence SOURCE/GROUP at the store (its source is refused from now on, and shows "
                    "`fenced`), and move the images of its newest point to DIR/GROUP/... as a datastore "
                    "that `vrfs mount DIR` serves, tracking from that point. A rename when DIR is on the "
                    "store's file system. Works whether or not `vrfs serve` runs on the store.")
    fo.add_argument("group", metavar="SOURCE/GROUP")
    fo.add_argument("--store", metavar="URL", required=True, help="the store, e.g. dir:/srv/replicas")
    fo.add_argument("--point", metavar="ID", type=int, help="the point (default: the newest)")
    fo.add_argument("--to", metavar="DIR", required=True, help="the datastore to be: a new or empty directory")

    rp = sub.add_parser(
        "reprotect", help="make an old datastore the seed of replicating back to it",
        description="At the original site, once it is back after a failover and its `vrfs mount` is "
                    "stopped: the images of DATASTORE become the seeds of the reverse direction in "
                    "STORE, with what their state files know (the last acknowledged point, the blocks "
                    "changed after it). Then `vrfs serve --store STORE` here and `vrfs mount "
                    "--peer HERE` at the DR site replicate back, and the first cycle moves only the blocks "
                    "that differ. Failback is the same in the other direction.")
    rp.add_argument("--datastore", metavar="DIR", required=True, help="the old datastore (not mounted)")
    rp.add_argument("--store", metavar="URL", required=True, help="the store of the reverse direction, dir:PATH")

    r = sub.add_parser(
        "serve", help="receive replication at the DR site",
        description="Accept replication from protected sites and keep each replica at a "
                    "crash-consistent point in STORE.",
    )
    r.add_argument("--listen", metavar="HOST:PORT", default=f"0.0.0.0:{DEFAULT_PORT}",
                   help=f"address to listen on (default: 0.0.0.0:{DEFAULT_PORT})")
    r.add_argument("--store", metavar="URL", required=True,
                   help="where replicas live: dir:PATH (sparse files) or dev:MAPFILE (block devices)")
    r.add_argument("--retain", metavar="POLICY", default="",
                   help="older points to keep besides the newest, as SPAN:EVERY rules, e.g. 1h:5m,1d:1h,7d:1d "
                        "(one point per 5 minutes for the last hour, one per hour for a day, one per day for a "
                        "week); a point costs the blocks that changed after it (default: the newest only; "
                        "dir: stores)")
    r.add_argument("--max-connections", metavar="N", type=_positive_int, default=None,
                   help="connections served at once (default: 64, fewer when the descriptor limit, ulimit -n, "
                        "leaves less than 64 descriptors beside them for the store). At the bound a new "
                        "connection takes the place of the oldest one still in its handshake, or of a "
                        "session silent for more than 10 minutes; else it is closed at once, unread. One "
                        "source needs one connection")
    _metrics(r, "point age, cycles, bytes received and refusals per source and group")
    _link_security(r, "the receiver")
    r.add_argument("--foreground", "-f", action="store_true",
                   help="stay in the foreground and log to standard error")
    r.add_argument("--log", metavar="FILE", help="log file of the background daemon")
    r.add_argument("--debug", action="store_true", help="verbose logging")

    k = sub.add_parser(
        "keygen", help="make this site's key and certificate",
        description="Make a private key and a self-signed certificate for this site in TLS_DIR, and print the "
                    "certificate's fingerprint. Every peer pins it with `vrfs trust add`: the link between sites "
                    "is mutual TLS 1.3 between pinned certificates, no certificate authority involved.")
    _tls_dir(k)
    k.add_argument("--name", metavar="NAME",
                   help="the site's name in its certificate (default: the host name)")
    k.add_argument("--days", metavar="N", type=int, default=DEFAULT_DAYS,
                   help=f"validity of the certificate in days (default: {DEFAULT_DAYS})")
    k.add_argument("--force", action="store_true",
                   help="replace an existing key (every peer must then pin the new certificate)")

    t = sub.add_parser(
        "trust", help="pin the peers this site talks to",
        description="A receiver accepts a source only by a certificate pinned under the source's name (the name "
                    "it gives with `vrfs mount --name`), and that source may only touch its own replicas. A source "
                    "connects only to a receiver whose certificate or fingerprint is pinned. Changes take effect "
                    "at the next connection, without a restart.")
    tsub = t.add_subparsers(dest="trust_command", metavar="ACTION", parser_class=_Parser)
    tsub.required = True
    ta = tsub.add_parser("add", help="pin a peer",
                         description="Pin NAME to a certificate (a copy of the peer's site.crt) or to its "
                                     "fingerprint (sha256:..., as `vrfs keygen` printed it; enough for a source to "
                                     "pin its receiver, while a receiver needs a source's certificate).")
    ta.add_argument("name", metavar="NAME", help="the peer's name; for a source, its `vrfs mount --name`")
    ta.add_argument("peer", metavar="CERT|FINGERPRINT")
    _tls_dir(ta)
    tl = tsub.add_parser("list", help="list the pinned peers")
    _tls_dir(tl)
    tl.add_argument("--json", action="store_true", help="machine-readable output")
    tr = tsub.add_parser("remove", help="unpin a peer: it is refused from its next connection")
    tr.add_argument("name", metavar="NAME")
    _tls_dir(tr)
    return p


def _metrics(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help=f"serve Prometheus metrics at http://HOST:PORT/metrics ({what}; docs/monitoring.md); "
                        "default: off")


def _tls_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-dir", metavar="DIR", default=DEFAULT_TLS_DIR,
                   help=f"this site's key and pinned peers (default: {DEFAULT_TLS_DIR}; one per site, so two "
                        "sites can live on one machine)")


def _link_security(p: argparse.ArgumentParser, end: str) -> None:
    _tls_dir(p)
    p.add_argument("--insecure", action="store_true",
                   help=f"plain TCP instead of mutual TLS: nothing authenticated, nothing encrypted; both ends "
                        f"must say it, and {end} shows it in its status and log (for tests on one host)")


EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a command ended by SIGPIPE


def _escape_names(exc: UnicodeError) -> tuple[str, int]:
    """File names are bytes: one that is not valid in the locale's encoding reaches
    us with surrogate escapes. Shown as `ls -b` would (vm1/\\xff.raw), never a crash."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    text = exc.object[exc.start:exc.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else c.encode("ascii", "backslashreplace").decode() for c in text), exc.end


codecs.register_error("vrfs-escape", _escape_names)


def main(argv: list[str] | None = None) -> int:
    try:
        sys.stdout.reconfigure(errors="vrfs-escape")  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        pass
    try:
        code = _dispatch(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except UserError as exc:
        print(f"vrfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`vrfs status | head -1`): quietly, like any
        # Unix command. Python would still try to flush stdout at exit and
        # complain, so it points at /dev/null from now on.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _dispatch(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "mount":
        from vrfs.mount import mount_main
        return mount_main(args)
    if args.command == "umount":
        from vrfs.umountcmd import umount_main
        return umount_main(args)
    if args.command == "status":
        from vrfs.status import status_main
        return status_main(args)
    if args.command == "verify":
        from vrfs.verifycmd import verify_main
        return verify_main(args)
    if args.command in ("points", "test-failover", "failover", "reprotect"):
        from vrfs import drcmd
        return {"points": drcmd.points_main, "test-failover": drcmd.test_failover_main,
                "failover": drcmd.failover_main, "reprotect": drcmd.reprotect_main}[args.command](args)
    if args.command == "plan":
        from vrfs.plancmd import plan_main
        return plan_main(args)
    if args.command == "serve":
        from vrfs.serve import serve_main
        return serve_main(args)
    if args.command in ("keygen", "trust"):
        from vrfs import trustcmd
        return trustcmd.keygen_main(args) if args.command == "keygen" else trustcmd.trust_main(args)
    raise AssertionError(args.command)
