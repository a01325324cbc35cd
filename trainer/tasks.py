"""Coroutines run together under a task group: the first failure cancels the rest and is raised as
itself (not as an ``ExceptionGroup``), so callers catch errors by meaning (``swarm.errors``)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Iterable, TypeVar

__all__ = ["gather_all", "first_error"]

T = TypeVar("T")


async def gather_all(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Run ``coros`` together and return their results in order; the first failure cancels the rest
    and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coro) for coro in coros]
    except BaseExceptionGroup as e:
        raise first_error(e) from None
    return [task.result() for task in tasks]


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error a failed group raises: the first one that is not a consequence of cancelling."""
    leaves = []
    stack: list[BaseException] = [group]
    while stack:
        error = stack.pop(0)
        if isinstance(error, BaseExceptionGroup):
            stack[:0] = list(error.exceptions)
        else:
            leaves.append(error)
    return next((e for e in leaves if not isinstance(e, asyncio.CancelledError)), leaves[0])
