"""Waiting, in async unit tests, for a condition that the code under test has no event for."""

from __future__ import annotations

from collections.abc import Callable

import anyio


async def until(condition: Callable[[], bool], within: float = 5.0, interval: float = 0.01) -> None:
    """Polls `condition` until it holds; fails the test (TimeoutError) after `within` seconds."""
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - nothing to wait on: the state is a plain attribute
            await anyio.sleep(interval)
