"""What a failed trio nursery means: the one exception that mattered."""

from __future__ import annotations

import trio


def first_failure(group: BaseExceptionGroup) -> BaseException:
    """The first exception of a nursery's group that is not a cancellation
    (the others were cancelled because of it), depth first."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return next((exc for exc in leaves if not isinstance(exc, trio.Cancelled)), leaves[0])
