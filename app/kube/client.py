"""A small Kubernetes API client: list, watch, get, create, merge-patch.

Requests go through one aiohttp session with a bounded pool. Watches do not: each holds a connection of its
own for as long as it runs (HTTP/1.1), so in a shared pool enough of them (two per namespace, one per
replicated resource) would leave lists, status patches and Events waiting for a connection that never comes
back; and each event is handed on from the read callback (app/kube/stream.py says why).

kopa works on raw JSON (orjson) rather than the generated models: it is faster, lighter, and a watch line
can be as large as the 1 MiB object it carries.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Self
from urllib.parse import urlencode

import aiohttp
import anyio
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from app.kube.config import KubeConnection
from app.kube.stream import Endpoint, LineStream, StreamError

log = logging.getLogger(__name__)

JSON = dict[str, Any]

# Bounds for one request; a watch has its own read bound (see watch()) and connects within ACQUIRE_TIMEOUT.
CONNECT_TIMEOUT = 10.0  # one TCP connect
ACQUIRE_TIMEOUT = 30.0  # getting a connection: waiting for a free one in the pool, connect, proxy, TLS
REQUEST_TIMEOUT = 60.0
REQUEST_POOL = 32  # connections for requests; watches have their own, unbounded pool
MAX_429_RETRIES = 8
# After a failed reload, or one that gave credentials expired already, expired credentials are not loaded
# again for this long.
RELOAD_RETRY = 10.0


class KubeError(Exception):
    """Base of the errors this client raises."""


class KubeUnavailable(KubeError):
    """The API server could not be reached or answered 5xx: try again later."""


class KubeApiError(KubeError):
    """The API server answered with an error Status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class KubeGone(KubeApiError):
    """410 Gone: the resourceVersion is too old; list again."""


@dataclass(frozen=True)
class ListResult:
    items: list[JSON]
    resource_version: str


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    object: JSON


ConnectionLoader = Callable[[], Awaitable[KubeConnection]]
EventHandler = Callable[[WatchEvent], None]


def _api_error(status: int, body: bytes) -> KubeApiError:
    reason, message = "", body[:500].decode("utf-8", "replace")
    try:
        doc = orjson.loads(body)
        if isinstance(doc, dict):
            reason = str(doc.get("reason", ""))
            message = str(doc.get("message", message))
    except orjson.JSONDecodeError:
        pass
    if not reason:  # a plain-text answer ("404 page not found\n" from a CRD endpoint that went away)
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Error"
    cls = KubeGone if status == 410 else KubeApiError
    return cls(status, reason, " ".join(message.split()))  # one log line, whatever the server sent


class _Throttled(Exception):
    """Internal: the API server answered 429; `retry_after` is its Retry-After header ("" if none)."""

    def __init__(self, what: str, retry_after: str) -> None:
        super().__init__(what)
        self.retry_after = retry_after


def _wait_retry_after(state: RetryCallState) -> float:
    """The server's Retry-After (capped at a minute), else a capped, jittered exponential delay."""
    outcome = state.outcome
    exc = outcome.exception() if outcome is not None else None
    try:
        return max(0.0, min(float(exc.retry_after if isinstance(exc, _Throttled) else ""), 60.0))
    except ValueError:
        return min(0.5 * 2.0 ** (state.attempt_number - 1), 30.0) * random.uniform(0.8, 1.2)


def _log_throttled(state: RetryCallState) -> None:
    outcome = state.outcome
    what = outcome.exception() if outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    log.debug("API server throttled %s; retrying in %.1fs", what, delay)


class KubeClient:
    """One API server: a session for requests, opened on first use (inside the running event loop) and again
    if it was closed, and the watches open on it. Reloads credentials after a 401."""

    def __init__(self, connection: KubeConnection, reload: ConnectionLoader | None = None) -> None:
        self._conn = connection
        self._reload = reload
        self._reload_lock = anyio.Lock()
        self._reload_not_before = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._watches: set[LineStream] = set()
        self._endpoint: tuple[KubeConnection, Endpoint] | None = None

    def _new_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._conn.ssl_context, limit=REQUEST_POOL),
            timeout=aiohttp.ClientTimeout(
                total=REQUEST_TIMEOUT, connect=ACQUIRE_TIMEOUT, sock_connect=CONNECT_TIMEOUT
            ),
        )

    def _session_for_use(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self._new_session()
        return self._session

    def _endpoint_of(self, conn: KubeConnection) -> Endpoint:
        """What a watch connects to, built once per loaded connection."""
        if self._endpoint is None or self._endpoint[0] is not conn:
            tls: ssl.SSLContext | None = None
            if conn.host.startswith("https:"):
                # aiohttp's meaning of ssl=False and ssl=True, which the requests' session follows.
                if isinstance(conn.ssl_context, ssl.SSLContext):
                    tls = conn.ssl_context
                else:
                    tls = ssl.create_default_context()
                    if conn.ssl_context is False:
                        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
            server_name = conn.server_name if tls is not None else None
            endpoint = Endpoint(conn.host, tls, server_name, conn.proxy, conn.proxy_authorization)
            self._endpoint = (conn, endpoint)
        return self._endpoint[1]

    async def close(self, reason: str = "the client closed") -> None:
        """Closes the session (it opens again on next use) and ends the open watches with `reason`."""
        for stream in list(self._watches):
            stream.abort(reason)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @staticmethod
    def _per_request(conn: KubeConnection) -> dict[str, Any]:
        """Per-request options from the kubeconfig: its proxy-url and its tls-server-name."""
        options: dict[str, Any] = {}
        if conn.proxy:
            options["proxy"] = conn.proxy
            if conn.proxy_authorization:
                options["proxy_headers"] = {"Proxy-Authorization": conn.proxy_authorization}
        if conn.server_name and conn.ssl_context is not False:
            options["server_hostname"] = conn.server_name
        return options

    @staticmethod
    def _headers(conn: KubeConnection, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        # identity: the API server gzips responses over 128 KiB (every page of a large list) when asked to,
        # which costs it more CPU, and kopa more time, than the bytes it saves between a pod and its API.
        headers = {"Accept": "application/json", "Accept-Encoding": "identity", "User-Agent": "kopa"}
        if conn.authorization:
            headers["Authorization"] = conn.authorization
        if extra:
            headers.update(extra)
        return headers

    async def _current(self) -> KubeConnection:
        """The connection to send with: credentials that have expired (an exec plugin's token, an OIDC
        id-token) are loaded again first, as kubectl does, rather than sent to be refused with a 401."""
        conn = self._conn
        expires_at = conn.expires_at
        now = time.time()
        if expires_at is not None and now >= expires_at and now >= self._reload_not_before:
            await self._reload_credentials(conn)
        return self._conn

    async def _reload_credentials(self, stale: KubeConnection) -> bool:
        """Loads the credentials again, once for all the requests that found `stale` refused or expired."""
        if self._reload is None:
            return False
        async with self._reload_lock:
            if self._conn is not stale:  # another request reloaded them while this one waited
                return True
            try:
                fresh = await self._reload()
            except Exception as exc:  # the old credentials stay in use
                # An expired credential is not fetched again before this, so that a plugin that keeps
                # failing is not run (and logged) once per request.
                self._reload_not_before = time.time() + RELOAD_RETRY
                log.warning("could not reload Kubernetes credentials: %s", exc)
                return False
            # The SSL context is a new object at every load; what it was built from says whether it
            # changed. When only the token rotated (every 15 minutes with EKS exec plugins), the session,
            # and every open watch, carry on: the next request simply sends the new header.
            tls_changed = fresh.tls_fingerprint != self._conn.tls_fingerprint
            self._conn = fresh
            if fresh.expires_at is not None and fresh.expires_at <= time.time():
                # Expired already (a plugin's clock, or its bug): sent anyway, and fetched again only later.
                self._reload_not_before = time.time() + RELOAD_RETRY
            if tls_changed:
                await self.close("closed for new TLS settings")
                log.info("reloaded Kubernetes credentials from %s (TLS settings changed)", fresh.source)
            else:
                log.info("reloaded Kubernetes credentials from %s", fresh.source)
            return True

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> JSON:
        """One API call; retries 429 (honouring Retry-After) and one 401 after reloading credentials."""
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(_Throttled),
                stop=stop_after_attempt(MAX_429_RETRIES + 1),
                wait=_wait_retry_after,
                before_sleep=_log_throttled,
                reraise=True,
            ):
                with attempt:
                    return await self._request_once(method, path, params, body, content_type)
        except _Throttled:
            raise KubeUnavailable(f"{method} {path}: HTTP 429") from None
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _request_once(
        self, method: str, path: str, params: Mapping[str, str] | None, body: bytes | None, content_type: str
    ) -> JSON:
        """One request, or two when a 401 made the credentials reload."""
        for reloaded in (False, True):
            conn = await self._current()
            headers = self._headers(conn, {"Content-Type": content_type} if body is not None else None)
            try:
                async with self._session_for_use().request(
                    method,
                    conn.host + path,
                    params=params,
                    data=body,
                    headers=headers,
                    **self._per_request(conn),
                ) as resp:
                    payload = await resp.read()
                    status = resp.status
                    resp_headers = resp.headers
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise KubeUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            if status < 300:
                doc = orjson.loads(payload) if payload else {}
                return doc if isinstance(doc, dict) else {}
            if status == 429:
                raise _Throttled(f"{method} {path}", resp_headers.get("Retry-After", ""))
            if status == 401 and not reloaded and await self._reload_credentials(conn):
                continue
            if status >= 500:
                raise KubeUnavailable(f"{method} {path}: HTTP {status}")
            raise _api_error(status, payload)
        raise AssertionError("unreachable: the second round returns or raises")

    async def get(self, path: str) -> JSON:
        return await self.request("GET", path)

    async def create(self, path: str, obj: JSON) -> JSON:
        return await self.request("POST", path, body=orjson.dumps(obj))

    async def merge_patch(self, path: str, patch: JSON) -> JSON:
        return await self.request(
            "PATCH", path, body=orjson.dumps(patch), content_type="application/merge-patch+json"
        )

    async def list_pages(
        self, path: str, *, label_selector: str = "", field_selector: str = "", page_size: int = 500
    ) -> AsyncIterator[ListResult]:
        """Lists a collection in pages, so a large one never sits in memory as a whole.

        Each page carries the list's resourceVersion; the last page's is the one to watch from. If the
        continue token expires midway, KubeGone is raised and the caller lists again from the start.
        """
        params = {"limit": str(page_size)}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        while True:
            page = await self.request("GET", path, params=params)
            meta = page.get("metadata") or {}
            yield ListResult(page.get("items") or [], str(meta.get("resourceVersion", "")))
            token = meta.get("continue")
            if not token:
                return
            params["continue"] = token

    async def watch(
        self,
        path: str,
        *,
        resource_version: str,
        on_event: EventHandler,
        label_selector: str = "",
        field_selector: str = "",
        timeout_seconds: int = 300,
        idle_timeout: float = 330.0,
    ) -> None:
        """Hands each event to `on_event`, from the callback that read it, until the server ends the watch;
        a stream silent beyond idle_timeout is dead. What `on_event` raises ends the watch and is raised.

        Raises KubeGone when the resourceVersion expired (as HTTP 410 or as an ERROR event).
        """
        params = {
            "watch": "1",
            "allowWatchBookmarks": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_seconds),
        }
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        target = f"{path}?{urlencode(params)}"

        def on_line(line: bytes) -> None:
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                # Its bytes are not quoted: a replicated Secret's data must never reach a log line.
                raise KubeUnavailable(f"watch {path}: a line of {len(line)} bytes that is not JSON") from None
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                code = int(obj.get("code") or 0)
                raise _api_error(code, orjson.dumps(obj)) if code else KubeUnavailable(str(obj))
            on_event(WatchEvent(kind, obj))

        reloaded = False
        while True:
            conn = await self._current()
            stream = LineStream(on_line, idle_timeout=idle_timeout)
            self._watches.add(stream)
            try:
                status, payload = await stream.run(
                    self._endpoint_of(conn), target, self._headers(conn), ACQUIRE_TIMEOUT
                )
            except StreamError as exc:
                raise KubeUnavailable(f"watch {path}: {exc}") from None
            finally:
                self._watches.discard(stream)
            if status == 200:
                return
            if status == 401 and not reloaded and await self._reload_credentials(conn):
                reloaded = True
                continue
            if status >= 500 or status == 429:
                raise KubeUnavailable(f"watch {path}: HTTP {status}")
            raise _api_error(status, payload)
