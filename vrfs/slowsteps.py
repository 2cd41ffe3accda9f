"""A trio instrument that logs every task step holding the event loop longer
than a bound: on the mount, the loop also serves FUSE, so such a step is a
stall of every VM's I/O. Enabled by VRFS_SLOW_STEP_MS (a diagnostic, off by
default; scripts/bench-scheduler uses it to name what stalls the loop)."""

from __future__ import annotations

import logging
import os
import time

import trio

log = logging.getLogger("vrfs.loop")
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class SlowSteps(trio.abc.Instrument):
    def __init__(self, bound_ms: float) -> None:
        self.bound = bound_ms / 1e3
        self._started: dict[trio.lowlevel.Task, float] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started[task] = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        started = self._started.pop(task, None)
        if started is not None and (took := time.perf_counter() - started) > self.bound:
            frame = _where(task.coro)
            where = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"
            log.warning("loop held %.1f ms by %s (at %s)", took * 1e3, task.name, where)


def _where(coro):
    """Where the task stopped after the slow step: the innermost frame of
    vrfs itself along the chain of awaits (a task's root frame names only
    the loop that runs it), else the root frame."""
    found = None
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            break
        if found is None or PACKAGE_DIR in frame.f_code.co_filename:
            found = frame
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None) or getattr(coro, "ag_await", None)
    return found


def instruments() -> list[trio.abc.Instrument]:
    bound = os.environ.get("VRFS_SLOW_STEP_MS")
    return [SlowSteps(float(bound))] if bound else []
