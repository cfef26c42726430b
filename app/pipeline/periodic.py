"""A producer of time rather than of changes: every interval, it adds the same work keys to the queue.

The drift check is one: each source's CHECK key goes through the writer like any change, so a check starts
where no write of its source is in flight. The ConfigMaps' check runs there, in the writer; a replicated
collection's only starts there, and reads OPA beside the writer, which tells it what it writes meanwhile
(CollectionSync.check).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio

from app.model import WorkKey


async def every(
    interval: float, add: Callable[[WorkKey], None], keys: Callable[[], Sequence[WorkKey]]
) -> None:
    """`keys` is asked at each tick: the sources may have changed since the last."""
    while True:
        await anyio.sleep(interval)
        for key in keys():
            add(key)
