"""The lifecycle both HTTP adapters share: one aiohttp session per peer, made on first use, closed on exit."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Self

import aiohttp


class OwnedSession(ABC):
    """Opens its session lazily (inside the running event loop) and again if it was closed."""

    _session: aiohttp.ClientSession | None = None

    @abstractmethod
    def _new_session(self) -> aiohttp.ClientSession:
        """The session for this peer: its connector (TLS), limits and timeouts."""

    def _session_for_use(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self._new_session()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
