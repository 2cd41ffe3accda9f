"""A time budget per loop step for answers built over every group (status,
a metrics scrape): on the mount, the trio loop also serves FUSE, and one
step over 1,000 disks held every VM's I/O for milliseconds. The builder calls
``pause()`` after each group; past the budget it yields to the loop, so each
group is read in one step (consistent in itself) and different groups at
instants a few milliseconds apart."""

from __future__ import annotations

import time

import trio

STEP_BUDGET = 0.002  # seconds of work between two yields


class StepBudget:
    def __init__(self, budget: float | None = None) -> None:
        self.budget = STEP_BUDGET if budget is None else budget
        self.yields = 0
        self._since = time.perf_counter()

    async def pause(self) -> None:
        """Yield to the loop if this step has used its budget."""
        if time.perf_counter() - self._since >= self.budget:
            await trio.lowlevel.checkpoint()
            self.yields += 1
            self._since = time.perf_counter()
