"""`vrfs mount` and `vrfs umount`: checks the operator's input, wires the
tracker, the file system, the control socket and the shipper together, and
owns the order of startup and shutdown.

After a crash the file system is never unmounted by us (pyfuse3.close with
unmount=False): an empty directory where the datastore used to be would look
like a datastore without disks to everything that walks it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
from dataclasses import dataclass, field

import pyfuse3
import trio

from vrfs import control, daemon
from vrfs.bwlimit import Schedule, parse_schedule
from vrfs.durable import write_atomically
from vrfs.errors import EXIT_USAGE, UserError
from vrfs.fs import Datastore
from vrfs.layout import CONFIG_NAME, LOCK_NAME, STATE_DIR, TRACKING_DIR
from vrfs.mountinfo import is_fuse_mount
from vrfs.openwriters import describe, find_open_writers
from vrfs.parse import parse_address, parse_block_size, parse_duration
from vrfs.settings import parse_rpo_option
from vrfs.stepbudget import StepBudget
from vrfs.tracker import DEFAULT_EXTENT_SIZE, Tracker

log = logging.getLogger("vrfs.mount")

DEFAULT_BLOCK_SIZE = 64 << 10
SHUTDOWN_REPORT_AFTER = 20.0  # seconds of shutdown after which the daemon logs where every thread is


@dataclass
class MountConfig:
    source: str
    mountpoint: str
    root_fd: int
    vrfs_fd: int
    state_fd: int
    lock_fd: int
    block_size: int
    extent_size: int
    tracking: bool
    writeback_cache: bool
    peer: tuple[str, int] | None
    name: str
    rpo: float
    compress_level: int
    congestion: str
    checkpoint_interval: float
    debug: bool
    untracked_writers: str  # --force: files other processes write behind vrfs's back
    verify_every: float | None = None  # periodic online verify, seconds
    tls_dir: str | None = None  # the site's key and pins (vrfs/trust.py); None: plain TCP (--insecure)
    rules: list = field(default_factory=list)  # per-disk settings of --config (vrfs/settings.py)
    metrics_socket: socket.socket | None = None  # --metrics: bound before the daemon starts (vrfs/metrics.py)
    bwlimit: "Schedule | None" = None  # --bwlimit (vrfs/bwlimit.py)


def _open_source(source: str) -> int:
    try:
        fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UserError(f"source {source} does not exist") from None
    except NotADirectoryError:
        raise UserError(f"source {source} is not a directory") from None
    except OSError as exc:
        raise UserError(f"cannot open source {source}: {exc.strerror}") from None
    if not os.access(source, os.R_OK | os.W_OK | os.X_OK):
        os.close(fd)
        raise UserError(f"source {source} is not readable and writable by this user")
    return fd


def _check_mountpoint(mountpoint: str) -> None:
    if not os.path.exists(mountpoint):
        raise UserError(f"mount point {mountpoint} does not exist")
    if not os.path.isdir(mountpoint):
        raise UserError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise UserError(f"mount point {mountpoint} is already a mount point")
    if os.listdir(mountpoint):
        raise UserError(f"mount point {mountpoint} is not empty")


def _check_open_writers(source: str, force: bool) -> str:
    """Files under SOURCE that other processes hold open for writing keep
    being written through those descriptors, never through the mount: such
    writes are not tracked and the replica diverges without a sign. Refused
    unless forced; forced, the description of the writers is returned for
    the log."""
    writers = find_open_writers(source, exclude=[STATE_DIR], ignore_pids=[os.getpid()])
    if not writers:
        return ""
    listed = describe(writers)
    if not force:
        raise UserError(f"{source} has files open for writing by other processes: {listed}; "
                        "stop them first, or pass --force (their writes will not be tracked "
                        "and the replicas of these files can differ from the source)")
    return listed


def _open_state(root_fd: int, source: str, block_size_arg: str | None) -> tuple[int, int, int, int, int]:
    """The .vrfs directory, its lock, its state subdirectory and the
    datastore's fixed settings."""
    where = f"{source}/{STATE_DIR}"
    try:
        try:
            os.mkdir(STATE_DIR, 0o700, dir_fd=root_fd)
        except FileExistsError:
            pass
        vrfs_fd = os.open(STATE_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
        lock_fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=vrfs_fd)
    except NotADirectoryError:
        raise UserError(f"{where} is not a directory: vrfs keeps its state there; "
                        "move it away") from None
    except OSError as exc:
        raise UserError(f"cannot open {where}: {exc.strerror}") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(lock_fd, 32, 0).decode(errors="replace").strip()
        raise UserError(f"{source} is already served by vrfs (pid {holder or '?'})") from None
    try:
        try:
            os.mkdir(TRACKING_DIR, 0o700, dir_fd=vrfs_fd)
        except FileExistsError:
            pass
        state_fd = os.open(TRACKING_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=vrfs_fd)
    except OSError as exc:
        raise UserError(f"cannot open {where}/state: {exc.strerror}") from None

    requested = parse_block_size(block_size_arg) if block_size_arg else None
    try:
        fd = os.open(CONFIG_NAME, os.O_RDONLY | os.O_CLOEXEC, dir_fd=vrfs_fd)
        with os.fdopen(fd) as f:
            config = json.load(f)
        block_size, extent_size = config["block_size"], config["extent_size"]
        _check_sizes(block_size, extent_size)
    except FileNotFoundError:
        block_size, extent_size = requested or DEFAULT_BLOCK_SIZE, DEFAULT_EXTENT_SIZE

        write_atomically(vrfs_fd, CONFIG_NAME, json.dumps(
            {"block_size": block_size, "extent_size": extent_size}).encode())
    except OSError as exc:
        raise UserError(f"cannot read {where}/{CONFIG_NAME}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{where}/{CONFIG_NAME} is damaged ({exc}); "
                        "move it away to start over with a full sync") from None
    if requested and requested != block_size:
        raise UserError(f"{source} uses block size {block_size // 1024}K; it cannot change to "
                        f"{requested // 1024}K once its state exists", EXIT_USAGE)
    return vrfs_fd, lock_fd, state_fd, block_size, extent_size


MAX_EXTENT_SIZE = 1 << 30


def _check_sizes(block_size, extent_size) -> None:
    """The settings a datastore.json may hold (ValueError when not)."""
    if type(block_size) is not int or not 4096 <= block_size <= (1 << 20) or block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size!r} is not a power of two from 4K to 1M")
    if (type(extent_size) is not int or not block_size <= extent_size <= MAX_EXTENT_SIZE
            or extent_size % block_size):
        raise ValueError(f"extent_size {extent_size!r} is not a multiple of the block size "
                         f"from {block_size} to {MAX_EXTENT_SIZE}")


def _check_tls(args, peer: tuple[str, int] | None) -> str | None:
    """The TLS directory the shipper will use (None: --insecure), checked now:
    a missing key or pin is one line at the command, not a retry loop later."""
    if args.insecure:
        if peer is None:
            raise UserError("--insecure needs --peer: it concerns the link to the DR site", EXIT_USAGE)
        return None
    if peer is None:
        return args.tls_dir
    from vrfs.trust import TlsDir, TrustError
    try:
        tls_dir = TlsDir(args.tls_dir).usable("client")
    except TrustError as exc:
        raise UserError(str(exc)) from None
    if not tls_dir.pins():
        raise UserError(f"no receiver is pinned in {tls_dir.trusted_path}: `vrfs trust add NAME CERT|FINGERPRINT "
                        f"--tls-dir {tls_dir.path}` with the DR site's certificate or fingerprint")
    return str(tls_dir.path)


def mount_main(args) -> int:
    source = os.path.abspath(args.source)
    mountpoint = os.path.abspath(args.mountpoint) if args.mountpoint else source
    # An empty option is a mistake, not "the default": `--peer "$DR"` with DR unset
    # must not mount without replicating.
    peer = parse_address(args.peer, what="--peer") if args.peer is not None else None
    rpo = parse_rpo_option(args.rpo)
    verify_every = parse_duration(args.verify_every, "--verify-every") if args.verify_every is not None else None
    if verify_every is not None and peer is None:
        raise UserError("--verify-every needs --peer: a verify compares with the DR site", EXIT_USAGE)
    bwlimit = parse_schedule(args.bwlimit) if args.bwlimit is not None else None
    if bwlimit is not None and peer is None:
        raise UserError("--bwlimit needs --peer: it limits the link to the DR site", EXIT_USAGE)
    checkpoint_interval = parse_duration(os.environ.get("VRFS_CHECKPOINT_INTERVAL", "30s"),
                                         "VRFS_CHECKPOINT_INTERVAL")
    if not 1 <= args.compress_level <= 19:
        raise UserError(f"bad compression level {args.compress_level}: must be 1-19", EXIT_USAGE)
    if args.name is not None and not args.name.strip():
        raise UserError(f"bad --name {args.name!r}: must not be empty", EXIT_USAGE)
    name = args.name if args.name is not None else socket.gethostname()
    from vrfs.wire import ProtocolError, check_name
    try:
        check_name(name, "source name")
    except ProtocolError as exc:
        raise UserError(f"bad --name {name!r}: {exc}", EXIT_USAGE) from None

    tls_dir = _check_tls(args, peer)
    from vrfs.settings import load_config
    rules = load_config(args.config) if args.config is not None else []
    if args.metrics is not None and peer is None:
        raise UserError("--metrics needs --peer: the metrics are those of replication", EXIT_USAGE)

    root_fd = _open_source(source)
    if is_fuse_mount(source):
        raise UserError(f"{source} is already a FUSE mount")
    if mountpoint != source:
        _check_mountpoint(mountpoint)
    vrfs_fd, lock_fd, state_fd, block_size, extent_size = _open_state(root_fd, source, args.block_size)
    # After the lock: a datastore already served elsewhere is reported as
    # such, not as its own daemon's open files.
    untracked_writers = _check_open_writers(source, args.force)
    metrics_socket = None
    if args.metrics is not None:
        from vrfs.metrics import bind
        metrics_socket = bind(args.metrics)  # a port in use is a one-line error, before anything is mounted

    config = MountConfig(
        source=source, mountpoint=mountpoint, root_fd=root_fd, vrfs_fd=vrfs_fd, state_fd=state_fd,
        lock_fd=lock_fd, block_size=block_size, extent_size=extent_size,
        tracking=not args.no_tracking, writeback_cache=not args.no_writeback_cache, peer=peer,
        name=name, rpo=rpo, compress_level=args.compress_level, congestion=args.congestion,
        checkpoint_interval=checkpoint_interval, debug=args.debug,
        untracked_writers=untracked_writers, verify_every=verify_every, tls_dir=tls_dir, rules=rules,
        metrics_socket=metrics_socket,
        bwlimit=bwlimit,
    )
    service = lambda ready: _run(config, ready)  # noqa: E731
    if args.foreground:
        return daemon.foreground(service, args.debug)

    def open_log():
        if args.log:
            return open(args.log, "a", buffering=1)
        fd = os.open("mount.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600,
                     dir_fd=vrfs_fd)
        return os.fdopen(fd, "a", buffering=1)

    return daemon.run_in_background(service, open_log, args.debug, "mount")


def _run(config: MountConfig, ready) -> int:
    os.ftruncate(config.lock_fd, 0)
    os.pwrite(config.lock_fd, f"{os.getpid()}\n".encode(), 0)
    limiter = trio.CapacityLimiter(4)
    tracker = None
    if config.tracking:
        tracker = Tracker(config.state_fd, config.root_fd, config.block_size, config.extent_size,
                          checkpoint_interval=config.checkpoint_interval)
        tracker.load()
    control_path = control.socket_path()
    ops = Datastore(config.root_fd, tracker, writeback_cache=config.writeback_cache,
                    limiter=limiter, control_path=control_path)
    options = set(pyfuse3.default_options)
    options |= {"fsname=vrfs", "subtype=vrfs"}
    if os.geteuid() == 0:
        options.add("allow_other")  # the hypervisor runs as its own user
    if config.debug:
        options.add("debug")
    try:
        pyfuse3.init(ops, config.mountpoint, options)
    except RuntimeError as exc:
        raise UserError(f"cannot mount at {config.mountpoint}: {exc}") from None
    log.info("mounted %s at %s (block size %dK, tracking %s, writeback cache %s)",
             config.source, config.mountpoint, config.block_size // 1024,
             "on" if tracker else "off", "on" if config.writeback_cache else "off")
    if config.untracked_writers:
        log.warning("--force: files open for writing by other processes since before the mount: "
                    "%s; their writes will not be tracked and the replicas of these files can "
                    "differ from the source", config.untracked_writers)
    settings = None
    if tracker is not None:
        from vrfs.diskxattrs import DiskAttributes
        from vrfs.settings import Settings
        settings = Settings({"rpo": config.rpo, "compression": config.compress_level}, config.rules, config.vrfs_fd)
        settings.forget({d.disk_id for d in tracker.disks.values()})
        ops.disk_attributes = DiskAttributes(settings, live=lambda disk: tracker.describe(disk),
                                             checkpoint=tracker.checkpoint)
    try:
        shipper = None
        if tracker is not None and config.peer is not None:
            from vrfs.shipper import Shipper
            from vrfs.verify import Verifier
            verifier = Verifier(tracker, config.root_fd, config.vrfs_fd, limiter, config.verify_every)
            from vrfs.tls import ClientTls
            from vrfs.trust import TlsDir
            tls = ClientTls(TlsDir(config.tls_dir) if config.tls_dir is not None else None)
            shipper = Shipper(tracker, config.root_fd, config.vrfs_fd, config.peer, config.name,
                              config.rpo, config.compress_level, config.congestion, verifier=verifier, tls=tls,
                              settings=settings, bwlimit=config.bwlimit)
            assert ops.disk_attributes is not None
            ops.disk_attributes.live = lambda disk: {**tracker.describe(disk), **shipper.describe(disk)}
            ops.disk_attributes.on_change = lambda disk: shipper.setting_changed(disk.group)
        from vrfs.slowsteps import instruments
        trio.run(_serve, config, ops, tracker, shipper, control_path, ready, instruments=instruments())
    except BaseException:
        log.exception("the file system failed; leaving the mount in place (unmount it with "
                      "`fusermount3 -u %s`)", config.mountpoint)
        pyfuse3.close(unmount=False)
        raise
    pyfuse3.close(unmount=True)
    log.info("unmounted %s", config.mountpoint)
    return 0


async def _serve(config: MountConfig, ops: Datastore, tracker: Tracker | None, shipper,
                 control_path: str, ready) -> None:
    async def handle(request: dict) -> dict:
        op = request.get("op")
        if op == "status":
            return await _status(config, tracker, shipper, bool(request.get("ranges")))
        if op == "checkpoint" and tracker is not None:
            await tracker.checkpoint()
            return {"checkpoints": tracker.checkpoints}
        if op in ("verify", "verify-status", "verify-pause"):
            return await _verify_request(shipper, request)
        return {"error": f"unknown request {op!r}"}

    async with trio.open_nursery() as nursery:
        if tracker is not None:
            nursery.start_soon(tracker.run_activity_log)
            await tracker.start()
            nursery.start_soon(tracker.run_checkpoints)
        await nursery.start(control.serve_control, control_path, handle)
        nursery.start_soon(_stop_on_signal)
        async with trio.open_nursery() as shipping:
            if shipper is not None:
                shipping.start_soon(shipper.run)
                shipping.start_soon(shipper.monitor.watch)  # logs RPO violated / met again
                if config.metrics_socket is not None:
                    from vrfs import metrics
                    collector = metrics.SourceCollector(shipper)
                    shipping.start_soon(metrics.serve, config.metrics_socket, metrics.registry_for(collector),
                                        collector.refresh)
            ready()
            await pyfuse3.main(min_tasks=4)
            # The kernel is done with us: no more writes can arrive. A cycle in
            # flight stays unacknowledged; its blocks stay dirty.
            log.info("shutting down: stopping the shipper, then the final checkpoint")
            daemon.report_stacks_after(SHUTDOWN_REPORT_AFTER)
            shipping.cancel_scope.cancel()
        if tracker is not None:
            await tracker.shutdown()
        nursery.cancel_scope.cancel()
    daemon.cancel_stack_report()


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: shutting down", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _verify_request(shipper, request: dict) -> dict:
    if shipper is None or shipper.verifier is None:
        return {"error": "this datastore does not replicate (no --peer): there is nothing to verify"}
    verifier = shipper.verifier
    op = request["op"]
    if op == "verify":
        groups, repair, rate = request.get("groups", []), request.get("repair", False), request.get("rate", 0)
        if not (isinstance(groups, list) and all(isinstance(g, str) for g in groups)
                and isinstance(repair, bool) and isinstance(rate, int) and not isinstance(rate, bool)
                and rate >= 0):
            return {"error": "bad verify request"}
        answer = verifier.start(groups, repair, rate)
        if "error" not in answer:
            await verifier.save()
            answer["connected"] = shipper.connected
        return answer
    if op == "verify-pause":
        verifier.pause()
        await verifier.save()
    answer = verifier.status()
    answer["connected"] = shipper.connected
    answer["link_error"] = shipper.last_error
    return answer


async def _status(config: MountConfig, tracker: Tracker | None, shipper, ranges: bool) -> dict:
    """The answer to `vrfs status`, built group by group with yields to the
    loop in between (vrfs/stepbudget.py): the disks of a group and its lag,
    point and rate are of one instant; two groups may be a few ms apart."""
    disks = []
    budget = StepBudget()
    for group in (tracker.group_names() if tracker else ()):
        assert tracker is not None  # there are groups only with a tracker
        shared = shipper.group_info(group) if shipper is not None else None
        for disk in tracker.group_disks(group):
            info = tracker.describe(disk, ranges)
            if shipper is not None:
                info.update(shipper.describe(disk, shared))
                if shipper.verifier is not None:
                    info["verify"] = shipper.verifier.disk_summary(disk)
            disks.append(info)
        await budget.pause()
    disks.sort(key=lambda d: d["path"])
    return {
        "source": config.source,
        "mountpoint": config.mountpoint,
        "name": config.name,
        "pid": os.getpid(),
        "block_size": config.block_size,
        "tracking": tracker is not None,
        "checkpoints": tracker.checkpoints if tracker else 0,
        "tracking_degraded": tracker.degraded if tracker else "",
        "last_checkpoint": tracker.last_checkpoint if tracker else None,
        "peer": f"{config.peer[0]}:{config.peer[1]}" if config.peer else None,
        "connected": shipper.connected if shipper else False,
        "insecure": shipper.tls.dir is None if shipper else False,
        "link": shipper.security if shipper else None,
        "bwlimit": _bwlimit_status(shipper),
        "disks": disks,
    }


def _bwlimit_status(shipper) -> dict | None:
    bucket = shipper.bwlimit if shipper else None
    if bucket is None:
        return None
    from vrfs.bwlimit import format_rate
    rate = bucket.rate()
    return {"schedule": bucket.schedule.describe(), "rate_bytes_per_second": rate, "rate": format_rate(rate)}
