"""Small asyncio helpers for tests: run a coroutine on uvloop with a bound, poll a condition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 60) -> T:
    """Run ``coro`` on a fresh uvloop loop; fail it if it takes longer than ``timeout``.

    Data-plane servers and connections it leaves open are closed before the loop is.
    """

    async def bounded() -> T:
        from dvla.transport.endpoints import abort_all

        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            # A failed test may leave servers open; uvloop would then never close.
            await abort_all()

    return uvloop.run(bounded())


async def wait_until(cond: Callable[[], Any], timeout: float = 5.0) -> None:
    """Poll ``cond`` until it is true.

    Raises:
        AssertionError: it stayed false for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
