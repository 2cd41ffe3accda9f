"""Crash points for tests: VRFS_TEST_CRASH=NAME makes the process kill itself
(SIGKILL, no cleanup) where the code calls crash_point(NAME). Nothing else
reads this variable; see docs/receiver.md for the names."""

from __future__ import annotations

import logging
import os
import signal

CRASH_ENV = "VRFS_TEST_CRASH"

log = logging.getLogger("vrfs.testhooks")


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        log.warning("%s=%s: killing myself", CRASH_ENV, name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
