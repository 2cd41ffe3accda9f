"""Running a service in the background, the way an operator expects: the
command returns once the service is ready (exit 0), or prints the service's
one-line startup error (exit 1). Forks before trio starts."""

from __future__ import annotations

import faulthandler
import io
import logging
import os
import signal
import sys
from collections.abc import Callable

from vrfs.errors import UserError
from vrfs.parse import printable

log = logging.getLogger("vrfs.daemon")

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
STACKS_SIGNAL = signal.SIGUSR1


_log_stream = None  # where the stacks go (below): the daemon's log


class LogFormatter(logging.Formatter):
    """One record, one line: messages name files, and a file name may hold a
    newline (a forged line follows it) or bytes that are not UTF-8 (the log
    file's encoding would refuse the record). A traceback keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def setup_logging(stream, debug: bool) -> None:
    global _log_stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogFormatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # SIGUSR1 writes every thread's stack to the log, even when the trio
    # thread is stuck: `vrfs umount` sends it to a daemon that does not stop.
    try:
        faulthandler.register(STACKS_SIGNAL, file=stream, all_threads=True)
        _log_stream = stream
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        pass  # a stream without a descriptor: no stacks


def report_stacks_after(seconds: float) -> None:
    """Until cancel_stack_report(): every ``seconds``, every thread's stack to
    the log (a shutdown that does not finish says where it waits)."""
    if _log_stream is not None:
        faulthandler.dump_traceback_later(seconds, repeat=True, file=_log_stream)


def cancel_stack_report() -> None:
    faulthandler.cancel_dump_traceback_later()


def run_in_background(service: Callable[[Callable[[], None]], int], log_stream_opener: Callable[[], object],
                      debug: bool, what: str) -> int:
    """Fork; the child detaches, logs to the stream ``log_stream_opener`` opens,
    and runs ``service(ready)``. The parent returns 0 once ``ready()`` is
    called, or raises UserError with the child's reason."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace").strip()
        if message == "OK":
            return 0
        os.waitpid(pid, 0)
        raise UserError(message or f"the {what} daemon exited during startup")

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
        setup_logging(log_stream_opener(), debug)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.chdir("/")
        code = service(lambda: report("OK"))
    except UserError as exc:
        if logging.getLogger().handlers:  # before that, the parent prints it
            log.error("%s", exc)
        report(str(exc))
    except BaseException as exc:  # the daemon must say something rather than vanish
        if logging.getLogger().handlers:
            log.exception("%s daemon failed", what)
        report(f"{what} daemon failed: {type(exc).__name__}: {exc}")
    finally:
        logging.shutdown()
        os._exit(code)


def foreground(service: Callable[[Callable[[], None]], int], debug: bool) -> int:
    setup_logging(sys.stderr, debug)
    return service(lambda: None)
