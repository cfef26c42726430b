"""A loopback fake of the few Kubernetes API calls a watcher makes, for faults a real API server cannot be
made to produce on demand (a watch that ends at once, a watch that always answers 410, a 401 on one call).

It listens on 127.0.0.1 only, over plain HTTP or TLS, and counts what it was asked.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import orjson
from aiohttp import web

from devstack.processes import HOST

WatchMode = Literal["empty", "gone", "hold", "break", "forbidden", "outage"]
OUTAGE = 5  # watches the "outage" mode answers 503 before its 410
PATH = "/api/v1/namespaces/default/configmaps"


class FakeApi:
    """Lists answer an empty ConfigMapList; watches answer per `watch_mode`:

    - empty: 200 with no body at all, at once (the stream ends before any event)
    - gone: 410 Gone, every time
    - hold: 200, one BOOKMARK, then waits for `push` and sends one ADDED event, then stays open
    - break: 200, one ADDED event (resourceVersion 7), then the connection breaks in the middle of the answer
    - forbidden: 403, every time (a Role with list but not watch)
    - outage: 503 for the first OUTAGE watches (an API server coming back), then 410 once, then as hold
    GET {PATH}/<name> answers 401 unless the token is `valid_token` (None: any token is fine).
    """

    def __init__(self, watch_mode: WatchMode, valid_token: str | None = None) -> None:
        self.watch_mode = watch_mode
        self.valid_token = valid_token
        self.lists = 0
        self.watches = 0
        self.watched_from: list[str] = []  # each watch's resourceVersion
        self.watch_opened = asyncio.Event()  # set at each watch request
        self.gets = 0
        self.unauthorized = 0
        self.push = asyncio.Event()
        self.url = ""

    @property
    def requests(self) -> int:
        return self.lists + self.watches + self.gets

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(PATH, self._collection)
        app.router.add_get(PATH + "/{name}", self._object)
        return app

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "1":
            self.lists += 1
            return web.json_response(
                {"kind": "ConfigMapList", "metadata": {"resourceVersion": "5"}, "items": []}
            )
        self.watches += 1
        self.watched_from.append(request.query.get("resourceVersion", ""))
        self.watch_opened.set()
        if self.watch_mode == "empty":
            return web.Response(status=200, body=b"", content_type="application/json")
        if self.watch_mode == "gone" or (self.watch_mode == "outage" and self.watches == OUTAGE + 1):
            status = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
            return web.json_response(status, status=410)
        if self.watch_mode == "outage" and self.watches <= OUTAGE:
            return web.json_response({"kind": "Status", "code": 503, "message": "unavailable"}, status=503)
        if self.watch_mode == "forbidden":
            status = {"kind": "Status", "code": 403, "reason": "Forbidden", "message": "cannot watch"}
            return web.json_response(status, status=403)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        if self.watch_mode == "break":
            added = {"type": "ADDED", "object": {"metadata": {"name": "a", "resourceVersion": "7"}}}
            await response.write(orjson.dumps(added) + b"\n")
            assert request.transport is not None
            request.transport.close()  # no last chunk: the answer is cut short
            return response
        bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "6"}}}
        await response.write(orjson.dumps(bookmark) + b"\n")
        await self.push.wait()
        added = {"type": "ADDED", "object": {"metadata": {"name": "a", "resourceVersion": "7"}}}
        await response.write(orjson.dumps(added) + b"\n")
        await asyncio.Event().wait()  # open until the client goes away
        return response

    async def _object(self, request: web.Request) -> web.Response:
        self.gets += 1
        if self.valid_token is not None and request.headers.get("Authorization") != (
            f"Bearer {self.valid_token}"
        ):
            self.unauthorized += 1
            status = {"kind": "Status", "code": 401, "reason": "Unauthorized", "message": "Unauthorized"}
            return web.json_response(status, status=401)
        return web.json_response({"kind": "ConfigMap", "metadata": {"name": request.match_info["name"]}})


@asynccontextmanager
async def serving(api: FakeApi, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[FakeApi]:
    """Serves `api` on a free loopback port; sets api.url (https when ssl_context is given)."""
    runner = web.AppRunner(api.app(), shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0, ssl_context=ssl_context)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    port = server.sockets[0].getsockname()[1]
    api.url = f"{'https' if ssl_context else 'http'}://{HOST}:{port}"
    try:
        yield api
    finally:
        await runner.cleanup()
