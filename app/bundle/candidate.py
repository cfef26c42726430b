"""The candidate bundle that kopa's validation OPA downloads, and how kopa knows that OPA has tried it.

The validation OPA (`--opa-url` in bundle mode) downloads `/bundles/kopa-validation` with long polling, as
any OPA downloads a bundle. Its bundle plugin handles one download at a time: it asks, gets the candidate,
activates it (or fails to), records the outcome in its status, and only then asks again. So once kopa has
served revision R, the next request that arrives means the outcome of R is in the validation OPA's status
(`GET /v1/status`). So does a request whose `If-None-Match` names R: OPA downloaded R before (after a
failed activation it may also ask with the revision it still runs, which is then its outcome). That
handshake needs no clocks and no guessing.

Nothing here does I/O: the bundle server (`app/server/bundle.py`) reports arrivals and serves what `current`
holds; the compiler (`app/bundle/compiler.py`) offers candidates and waits for `tried`.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio


@dataclass(frozen=True)
class Offer:
    revision: str
    body: bytes


class Candidates:
    def __init__(self, first: Offer) -> None:
        self.current = first
        self.arrivals = 0  # requests from the validation OPA so far
        self._served_at: int | None = None  # arrivals so far when `current` was first served
        self._known = False  # the validation OPA asked with `current` as its ETag
        self._event = anyio.Event()  # set (and replaced) whenever something here changes

    def offer(self, offer: Offer) -> None:
        """Serves `offer` from now on (a request held in a long poll gets it at once)."""
        if offer.revision == self.current.revision:
            return
        self.current = offer
        self._served_at = None
        self._known = False
        self._changed()

    def arrived(self, etag: str) -> None:
        """A request from the validation OPA arrived, naming the revision it downloaded last."""
        self.arrivals += 1
        self.asked(etag)
        self._changed()

    def asked(self, etag: str) -> None:
        """The validation OPA waits with `etag` (which it has tried, if it is the current offer)."""
        if etag == self.current.revision and not self._known:
            self._known = True
            self._changed()

    def served(self, revision: str) -> None:
        """A request was answered with `revision`. Only requests that arrive after this one count as
        "tried" (a request that arrived earlier may be one that OPA has already given up on)."""
        if revision == self.current.revision and self._served_at is None:
            self._served_at = self.arrivals

    async def changed(self) -> None:
        """Returns at the next change of the offer or the next arrival."""
        await self._event.wait()

    def tried_now(self, revision: str) -> bool:
        """Whether the validation OPA has activated, or failed to activate, `revision` (the current offer):
        it was served and a request arrived after that, or it asked with `revision` as its ETag."""
        if self.current.revision != revision:
            return False
        return self._known or (self._served_at is not None and self.arrivals > self._served_at)

    async def tried(self, revision: str) -> None:
        while not self.tried_now(revision):
            await self.changed()

    def _changed(self) -> None:
        self._event.set()
        self._event = anyio.Event()
