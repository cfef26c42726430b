"""The Kubernetes client's request policy: 429 is retried as the server asks (Retry-After), a 401 reloads
the credentials once, 5xx is KubeUnavailable, 4xx the API's Status. The API server is aiohttp's own test
server on loopback, answering from a script: a real API server cannot be made to throttle on demand."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.kube import client as kube_client
from app.kube.client import KubeApiError, KubeClient, KubeUnavailable, _api_error
from app.kube.config import KubeConnection

pytestmark = pytest.mark.anyio


class Script:
    """Answers each GET with the next status of the script (the last one repeats)."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.seen: list[str | None] = []  # the Authorization header of each request

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request.headers.get("Authorization"))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if status == 200:
            return web.json_response({"kind": "ConfigMap", "metadata": {"name": "x"}})
        headers = {"Retry-After": "0"} if status == 429 else {}
        return web.json_response(
            {"kind": "Status", "reason": "R", "message": "m"}, status=status, headers=headers
        )


def connection(url: str, token: str = "old") -> KubeConnection:
    return KubeConnection(
        host=url, authorization=f"Bearer {token}", ssl_context=False, namespace="default", source="test"
    )


@pytest.fixture
async def api() -> AsyncIterator[tuple[Script, str]]:
    script = Script(200)
    app = web.Application()
    app.router.add_get("/api/v1/namespaces/default/configmaps/x", script.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        yield script, str(server.make_url("")).rstrip("/")


PATH = "/api/v1/namespaces/default/configmaps/x"


async def test_429_is_retried_as_the_server_asks(api: tuple[Script, str]) -> None:
    script, url = api
    script.statuses = [429, 429, 200]
    async with KubeClient(connection(url)) as kube:
        assert (await kube.get(PATH))["kind"] == "ConfigMap"
    assert len(script.seen) == 3


async def test_429_for_ever_gives_up_as_unavailable(api: tuple[Script, str]) -> None:
    script, url = api
    script.statuses = [429]
    async with KubeClient(connection(url)) as kube:
        with pytest.raises(KubeUnavailable, match="HTTP 429"):
            await kube.get(PATH)
    assert len(script.seen) == kube_client.MAX_429_RETRIES + 1


async def test_a_401_reloads_the_credentials_once(api: tuple[Script, str]) -> None:
    script, url = api
    script.statuses = [401, 200]
    reloads = 0

    async def reload() -> KubeConnection:
        nonlocal reloads
        reloads += 1
        return connection(url, "new")

    async with KubeClient(connection(url), reload=reload) as kube:
        assert (await kube.get(PATH))["kind"] == "ConfigMap"
        script.statuses = [401]
        with pytest.raises(KubeApiError) as refused:
            await kube.get(PATH)
    assert refused.value.status == 401
    assert script.seen[:2] == ["Bearer old", "Bearer new"]
    assert reloads == 2, "one reload per request that met a 401, never a loop"


async def test_5xx_is_unavailable_and_4xx_is_the_apis_status(api: tuple[Script, str]) -> None:
    script, url = api
    async with KubeClient(connection(url)) as kube:
        script.statuses = [503]
        with pytest.raises(KubeUnavailable, match="HTTP 503"):
            await kube.get(PATH)
        script.statuses = [404]
        with pytest.raises(KubeApiError) as missing:
            await kube.get(PATH)
    assert (missing.value.status, missing.value.reason, missing.value.message) == (404, "R", "m")


def test_an_error_answer_that_is_not_a_status_object_makes_one_readable_line() -> None:
    """A CRD endpoint that went away answers Go's plain "404 page not found\\n": the log line had an empty
    reason and a raw newline in it."""
    error = _api_error(404, b"404 page not found\n")
    assert str(error) == "404 Not Found: 404 page not found"
    status = b'{"kind":"Status","reason":"Forbidden","message":"cannot watch\\n services"}'
    assert str(_api_error(403, status)) == "403 Forbidden: cannot watch services"
    assert str(_api_error(599, b"odd")) == "599 Error: odd"
