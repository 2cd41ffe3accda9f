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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from vrfs.errors import UserError
from vrfs.link import tune_socket
from vrfs.parse import parse_address
from vrfs.receiver import Receiver
from vrfs.store import Store, StoreError, store_from_url

log = logging.getLogger("vrfs.serve")

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def serve_main(args: Any) -> int:
    host, port = parse_address(args.listen, what="listen address")
    try:
        store = store_from_url(args.store)
    except StoreError as exc:
        raise UserError(str(exc)) from None
    log_file = Path(args.log).absolute() if args.log else None
    if args.foreground:
        _open_store(store)
        _setup_logging(None, args.debug)
        return _run(store, host, port, ready=lambda: None)
    return _daemonize(store, host, port, log_file, args.debug)


def _open_store(store: Store) -> None:
    try:
        store.open()
    except StoreError as exc:
        raise UserError(str(exc)) from None


def _setup_logging(log_file: Path | None, debug: bool) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def _daemonize(store: Store, host: str, port: int, log_file: Path | None, debug: bool) -> int:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace").strip()
        if message == "OK":
            return 0
        os.waitpid(pid, 0)
        raise UserError(message or "the receiver daemon exited during startup")

    # The child: never returns into the command line.
    os.close(read_end)
    code = 1

    def report(text: str) -> None:
        try:
            os.write(write_end, text.encode() + b"\n")
            os.close(write_end)
        except OSError:
            pass

    try:
        os.setsid()
        _open_store(store)
        _setup_logging(log_file or store.state_dir / "serve.log", debug)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.chdir("/")
        pid_file = store.state_dir / "serve.pid"

        def ready() -> None:
            pid_file.write_text(f"{os.getpid()}\n")  # how an operator (or a test) finds the daemon
            report("OK")

        try:
            code = _run(store, host, port, ready=ready)
        finally:
            pid_file.unlink(missing_ok=True)
    except UserError as exc:
        if logging.getLogger().handlers:  # before that, the parent prints it
            log.error("%s", exc)
        report(str(exc))
    except BaseException as exc:  # the daemon must say something rather than vanish
        if logging.getLogger().handlers:
            log.exception("receiver daemon failed")
        report(f"receiver daemon failed: {type(exc).__name__}: {exc}")
    finally:
        logging.shutdown()
        os._exit(code)


def _run(store: Store, host: str, port: int, ready: Callable[[], None]) -> int:
    try:
        trio.run(_serve, store, host, port, ready)
    finally:
        store.close()
    return 0


async def _serve(store: Store, host: str, port: int, ready: Callable[[], None]) -> None:
    receiver = Receiver(store)
    await receiver.recover()
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    for listener in listeners:
        tune_socket(listener.socket, None)  # accepted sockets inherit the large buffers
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, receiver.handle, listeners)
            log.info("serving %s on %s:%d (store id %s)", store.url, host, port, store.store_id)
            ready()
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    log.info("stopped")
