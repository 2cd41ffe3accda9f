"""`vrfs serve`: the receiver daemon at the DR site.

Opens the store (its lock makes it the only server of that store), redoes
committed journals, listens, and serves each connection independently until
SIGTERM or SIGINT. Without --foreground it forks before trio starts; the
parent waits on a pipe until the child listens (exit 0) or reports its
one-line startup error (exit 1).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from vrfs import admission, control, daemon, recovery
from vrfs.errors import UserError
from vrfs.sockets import tune_socket
from vrfs.parse import parse_address
from vrfs.receiver import HANDSHAKE_TIMEOUT, Receiver, peer_name
from vrfs.retention import format_policy, parse_policy
from vrfs.store import Store, StoreError, store_from_url
from vrfs.store.base import CONTROL_FILE
from vrfs.tls import ServerTls, close
from vrfs.trust import TlsDir, TrustError
from vrfs.wire import ProtocolError, check_name

log = logging.getLogger("vrfs.serve")



def serve_main(args: Any) -> int:
    host, port = parse_address(args.listen, what="listen address")
    policy = parse_policy(args.retain)
    try:
        store = store_from_url(args.store)
    except StoreError as exc:
        raise UserError(str(exc)) from None
    store.policy = policy
    tls = server_tls(args)
    admission.configure(args.max_connections)
    metrics_socket = None
    if args.metrics is not None:
        from vrfs.metrics import bind
        metrics_socket = bind(args.metrics)  # a port in use is a one-line error at the command
    log_file = Path(args.log).absolute() if args.log else None
    if args.foreground:
        _open_store(store)
        return daemon.foreground(lambda ready: _run(store, host, port, tls, ready, metrics_socket), args.debug)

    def open_store_and_log():
        _open_store(store)
        return open(log_file or store.state_dir / "serve.log", "a", buffering=1)

    def service(ready: Callable[[], None]) -> int:
        pid_file = store.state_dir / "serve.pid"

        def written_ready() -> None:
            pid_file.write_text(f"{os.getpid()}\n")  # how an operator (or a test) finds the daemon
            ready()

        try:
            return _run(store, host, port, tls, written_ready, metrics_socket)
        finally:
            pid_file.unlink(missing_ok=True)

    return daemon.run_in_background(service, open_store_and_log, args.debug, "receiver")


def server_tls(args: Any) -> ServerTls:
    """The receiver's TLS, checked before the daemon starts: a missing or
    expired site key is one line at the command, not a log entry later."""
    if args.insecure:
        return ServerTls(None, HANDSHAKE_TIMEOUT)
    try:
        tls_dir = TlsDir(args.tls_dir).usable("server")
    except TrustError as exc:
        raise UserError(str(exc)) from None
    return ServerTls(tls_dir, HANDSHAKE_TIMEOUT)


def _open_store(store: Store) -> None:
    try:
        store.open()
    except StoreError as exc:
        raise UserError(str(exc)) from None


def _run(store: Store, host: str, port: int, tls: ServerTls, ready: Callable[[], None],
         metrics_socket: socket.socket | None = None) -> int:
    try:
        trio.run(_serve, store, host, port, tls, ready, metrics_socket)
    finally:
        store.close()
    return 0


async def _serve(store: Store, host: str, port: int, tls: ServerTls, ready: Callable[[], None],
                 metrics_socket: socket.socket | None = None) -> None:
    receiver = Receiver(store)

    async def connection(stream: admission.AdmittedStream) -> None:
        peer = peer_name(stream)
        accepted = None
        try:
            accepted = await tls.accept(stream, peer)
        finally:
            if accepted is None:  # refused (logged), or cancelled
                await close(stream)
        if accepted is not None:
            stream_, name, fp = accepted
            pinned = None if name is None or fp is None else (lambda: tls.still_pinned(name, fp))
            await receiver.handle(stream_, peer=peer, certified=name, pinned=pinned)

    await receiver.recover()
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    for listener in listeners:
        tune_socket(listener.socket, None)  # accepted sockets inherit the large buffers
    control_path = control.socket_path("serve")
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve_control, control_path, RecoveryRequests(store, receiver).handle)
            (store.state_dir / CONTROL_FILE).write_text(control_path + "\n")
            await nursery.start(admission.serve_listeners, connection, listeners)
            if metrics_socket is not None:
                from vrfs import metrics
                nursery.start_soon(metrics.serve, metrics_socket,
                                   metrics.registry_for(metrics.ReceiverCollector(receiver)))
            log.info("serving %s on %s:%d (store id %s, keeping %s, %s)", store.url, host, port, store.store_id,
                     format_policy(store.policy), _describe_tls(tls))
            ready()
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    (store.state_dir / CONTROL_FILE).unlink(missing_ok=True)
    log.info("stopped")


def _describe_tls(tls: ServerTls) -> str:
    if tls.dir is None:
        return "INSECURE: plain TCP, any peer may act as any source (--insecure)"
    sources = [p.name for p in tls.dir.pins() if p.certificate is not None]
    if not sources:
        log.warning("no source is pinned in %s: every source is refused until `vrfs trust add SOURCE CERT "
                    "--tls-dir %s`", tls.dir.trusted_path, tls.dir.path)
    return f"TLS 1.3, site {tls.dir.site_fingerprint()}, {len(sources)} pinned sources"


class RecoveryRequests:
    """What `vrfs points`, `vrfs failover` and `vrfs test-failover` ask a
    running server (vrfs/drcmd.py): done here, with the group held, so that
    no cycle of it lands meanwhile."""

    def __init__(self, store: Store, receiver: Receiver) -> None:
        self.store = store
        self.receiver = receiver

    async def handle(self, request: dict) -> dict:
        op = request.get("op")
        try:
            if op == "points":
                return {"points": await trio.to_thread.run_sync(
                    recovery.list_points, self.store, request.get("source"), request.get("group"))}
            if op == "reprotect":
                datastore = Path(str(request.get("datastore")))
                if not datastore.is_absolute():
                    return {"error": "bad request"}
                return {"lines": await trio.to_thread.run_sync(recovery.reprotect, self.store, datastore)}
            if op in ("failover", "test-failover"):
                source = check_name(request.get("source"), "source name")
                group = check_name(request.get("group"), "group")
                to = Path(str(request.get("to")))
                point = request.get("point")
                if not to.is_absolute() or not (point is None or type(point) is int):
                    return {"error": "bad request"}
                if op == "failover":
                    lines = await self.receiver.holding(source, group, recovery.failover, self.store, source,
                                                        group, to, point)
                else:
                    lines = await self.receiver.holding(source, group, recovery.test_failover, self.store,
                                                        source, group, to, str(request.get("format")), point)
                log.info("%s of %s/%s to %s: done", op, source, group, to)
                return {"lines": lines}
        except (UserError, ProtocolError) as exc:
            return {"error": str(exc)}
        except trio.TooSlowError:
            return {"error": "the group stayed busy receiving cycles for 2 minutes; try again"}
        except OSError as exc:
            log.exception("%s failed", op)
            return {"error": f"{op} failed: {exc}"}
        return {"error": f"unknown request {op!r}"}
