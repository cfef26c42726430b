"""OPA's REST API: policies and data, over a few keep-alive connections (transport.Connections).

A single call that fails transiently (connection error, timeout, 5xx, 429) is retried briefly here; past that
it raises OpaUnavailable and the caller decides. OPA's 4xx answers are final for that content: OpaError.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import quote

import anyio
import orjson
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from app.opa.credentials import ssl_context
from app.opa.transport import Connections, TransportError, connect

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
# Large collection PUTs take OPA seconds to apply; a wedged OPA must still not hang kopa forever.
REQUEST_TIMEOUT = 120.0
# The process check's request (GET /v1/config), which OPA answers without its store's lock, in milliseconds.
CHECK_TIMEOUT = 10.0
# Answers larger than this are parsed off the event loop (orjson takes about 40 ms per MB here).
LARGE_ANSWER = 1 << 20
# The pause before the first retry of a request that failed for a transient reason (tenacity's wait then
# spaces the later ones).
FIRST_RETRY_DELAY = 0.05


# (endpoint, method, status code or "error", seconds): what the metrics layer records per request.
Observe = Callable[[str, str, str, float], None]
# A request body sent in pieces as it is produced (chunked), never held whole: each call starts it afresh,
# so a retried request sends it again.
Chunks = Callable[[], AsyncIterator[bytes]]


class OpaUnavailable(Exception):
    """OPA could not be reached, timed out, or answered 5xx/429 even after brief retries."""


class OpaUnauthorized(OpaUnavailable):
    """OPA refused kopa's credentials (401/403): no write can succeed until the token is right again.

    Not an error of the policy or data being written, so it is never reported on a ConfigMap.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    @property
    def status_text(self) -> str:
        """What OPA answered, safe to log and to show in /readyz (never the token)."""
        return f"HTTP {self.status}"


@dataclass
class OpaError(Exception):
    """OPA refused the request (4xx). `body` is OPA's error object, kept for status annotations."""

    status: int
    code: str
    message: str
    body: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    @property
    def error_codes(self) -> list[str]:
        return error_codes(self.body)

    @property
    def files(self) -> set[str]:
        """The module ids OPA's detailed errors point at (location.file)."""
        found = set()
        for e in self.body.get("errors") or []:
            if isinstance(e, dict) and isinstance(e.get("location"), dict) and e["location"].get("file"):
                found.add(str(e["location"]["file"]))
        return found


def error_codes(body: dict[str, Any]) -> list[str]:
    """The codes of the detailed errors in OPA's error object, e.g. rego_parse_error, rego_type_error."""
    return [str(e.get("code", "")) for e in body.get("errors") or [] if isinstance(e, dict)]


class _Transient(Exception):
    """Internal: one attempt failed in a way worth repeating."""


def encode_path(segments: Sequence[str]) -> str:
    """Escapes each segment, so names with '/', '%' or spaces cannot change the path's shape."""
    return "/".join(quote(s, safe="") for s in segments)


def _reference(path: Sequence[str]) -> str:
    """A Rego reference to the document at path: each segment a JSON string, which is Rego's string syntax,
    so no name can change the reference's shape."""
    return "data" + "".join(f"[{orjson.dumps(segment).decode()}]" for segment in path)


class OpaClient:
    """The API of one OPA. `token` is asked for each request, so a rotated token file takes effect.

    `ssl_context` may be a callable (credentials.ReloadingTls) asked before each request: when it returns
    another context (a rotated CA), the next request opens a new connection under it.
    """

    def __init__(
        self,
        api_url: str,
        *,
        token: Callable[[], str | None] = lambda: None,
        ssl_context: ssl.SSLContext | bool | Callable[[], ssl.SSLContext] | None = None,
        attempts: int = 3,
        retry_budget: float = 2.0,
        observe: Sequence[Observe] = (),
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._observe = observe
        self._token = token
        self._ssl = ssl_context
        self._attempts = attempts
        self._retry_budget = retry_budget
        self._default_tls: ssl.SSLContext | None = None
        self._connections = Connections(
            self.api_url,
            tls=self._tls,
            limit=8,
            connect_timeout=CONNECT_TIMEOUT,
            request_timeout=REQUEST_TIMEOUT,
            user_agent="kopa",
        )

    def _tls(self) -> ssl.SSLContext | None:
        """The context for a new connection: None for http; the given one (asked anew each time, so a
        rotated CA takes effect); or, for True/False/None, one made once (verifying, or not at all)."""
        if not self._connections.origin.https:
            return None
        given = self._ssl() if callable(self._ssl) else self._ssl
        if isinstance(given, ssl.SSLContext):
            return given
        if self._default_tls is None:
            self._default_tls = ssl_context(allow_insecure=given is False)
        return self._default_tls

    async def close(self) -> None:
        self._connections.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _once(
        self, method: str, path: str, body: bytes | Chunks | None, content_type: str
    ) -> tuple[int, bytes]:
        headers = {"Content-Type": content_type} if body is not None else {}
        token = self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        started = time.monotonic()
        try:
            status, payload = await self._connections.request(
                method, path, headers, lambda: body() if callable(body) else body
            )
        except TransportError as exc:
            self._record(path, method, "error", started)
            # Transport errors describe the connection (host, TLS), never the request's headers and token.
            raise _Transient(f"{method} {self.api_url}/{path}: {exc}"[:500]) from None
        self._record(path, method, str(status), started)
        if status >= 500 or status == 429:
            raise _Transient(f"{method} {self.api_url}/{path}: HTTP {status}")
        return status, payload

    def _record(self, path: str, method: str, code: str, started: float) -> None:
        if self._observe:
            # The endpoint is the API's first segment (policies, data, config, health): few label values.
            endpoint, seconds = path.split("/", 1)[0] or "root", time.monotonic() - started
            for observe in self._observe:
                observe(endpoint, method, code, seconds)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | Chunks | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, bytes]:
        """Returns (status, body) for 2xx and 404; raises OpaError for other 4xx, OpaUnavailable."""
        started = time.monotonic()
        try:
            # The first attempt outside tenacity: its machinery costs more CPU than the request itself
            # (py-spy, churn at 50 updates/s), and nearly every request succeeds at once.
            status, payload = await self._once(method, path, body, content_type)
        except _Transient as first:
            budget = self._retry_budget - (time.monotonic() - started)
            if self._attempts < 2 or budget <= 0:
                raise OpaUnavailable(str(first)) from None
            try:
                status, payload = await self._retry(method, path, body, content_type, budget)
            except _Transient as exc:
                raise OpaUnavailable(str(exc)) from None
        if status == 404 and not _from_opa_api(payload):
            # A route OPA's API does not have (Go's "404 page not found"): --opa-url names something else,
            # and nothing kopa writes there can be taken for loaded.
            raise OpaUnavailable(
                f"{method} {self.api_url}/{path}: HTTP 404 without an OPA error (is --opa-url OPA's API, "
                "such as http://localhost:8181/v1?)"
            )
        if status < 300 or status == 404:
            return status, payload
        if status in (401, 403):
            message = _opa_error(status, payload).message
            raise OpaUnauthorized(f"{method} {self.api_url}/{path}: HTTP {status}: {message}", status)
        raise _opa_error(status, payload)

    async def _retry(
        self, method: str, path: str, body: bytes | Chunks | None, content_type: str, budget: float
    ) -> tuple[int, bytes]:
        """The attempts after a first one failed for a transient reason, within what is left of the
        budget (attempts and time both count the first)."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(_Transient),
            stop=stop_after_attempt(self._attempts - 1) | stop_after_delay(budget),
            wait=wait_exponential_jitter(multiplier=0.05, max=0.5, jitter=0.05),
            reraise=True,
        ):
            with attempt:
                if attempt.retry_state.attempt_number == 1:
                    await anyio.sleep(FIRST_RETRY_DELAY)
                return await self._once(method, path, body, content_type)
        raise AssertionError("unreachable: tenacity reraises the last failure")

    async def put_policy(self, policy_id: str, text: str) -> None:
        await self._write("PUT", f"policies/{encode_path(policy_id.split('/'))}", text.encode(), "text/plain")

    async def delete_policy(self, policy_id: str) -> bool:
        """False when OPA did not have it."""
        status, _ = await self.request("DELETE", f"policies/{encode_path(policy_id.split('/'))}")
        return status != 404

    async def get_policy(self, policy_id: str) -> dict[str, Any] | None:
        """One module as OPA holds it (`raw` text and compiled `ast`), None when OPA has no such id."""
        status, payload = await self.request("GET", f"policies/{encode_path(policy_id.split('/'))}")
        if status == 404:
            return None
        return dict(_result(payload, "policies") or {})

    async def list_policies(self) -> list[dict[str, Any]]:
        """Every module with its AST: megabytes for a few hundred modules, so a large answer is parsed in a
        worker thread rather than holding up the event loop (and the writer) for a few hundred ms."""
        _, payload = await self.request("GET", "policies")
        if len(payload) > LARGE_ANSWER:
            result = await anyio.to_thread.run_sync(_result, payload, "policies")
        else:
            result = _result(payload, "policies")
        return list(result or [])

    async def put_data(self, path: Sequence[str], document: bytes | Chunks) -> None:
        """Writes a JSON document (serialized, or produced in pieces), creating missing parents."""
        await self._write("PUT", f"data/{encode_path(path)}", document)

    async def delete_data(self, path: Sequence[str]) -> bool:
        status, _ = await self.request("DELETE", f"data/{encode_path(path)}")
        return status != 404

    async def patch_data(self, path: Sequence[str], operations: bytes) -> None:
        """Applies a JSON Patch, all or nothing (OPA applies none of them when one's path is missing)."""
        await self._write("PATCH", f"data/{encode_path(path)}", operations, "application/json-patch+json")

    async def _write(
        self, method: str, path: str, body: bytes | Chunks, content_type: str = "application/json"
    ) -> None:
        """A write that OPA answers 404 did not happen (a PATCH whose path is missing; a PUT under a parent
        that is not an object, `resource_conflict`): raised as OpaError, never taken for success."""
        status, payload = await self.request(method, path, body, content_type)
        if status == 404:
            raise _opa_error(status, payload)

    async def get_data(self, path: Sequence[str]) -> Any:
        """The document at path, or None when it is undefined."""
        status, payload = await self.request("GET", f"data/{encode_path(path)}")
        if status == 404:
            return None
        return _result(payload, "data")

    async def keys(self, path: Sequence[str]) -> list[str] | None:
        """The keys of the object at path; None when it is undefined or not an object. An ad-hoc query:
        it costs OPA a few milliseconds whatever the values' size, where a GET serializes all of them."""
        ref = _reference(path)
        rows = await self._query(f"x := [k | some k, _ in {ref}]; is_object({ref})", None)
        return [str(k) for k in rows[0]["x"]] if rows else None

    async def get_many(self, path: Sequence[str], names: Sequence[str]) -> dict[str, Any]:
        """The values at path/<name> for these names, each as OPA holds it; an undefined one is left out."""
        rows = await self._query(f"x := {{k: v | some k in input; v := {_reference(path)}[k]}}", list(names))
        return dict(rows[0]["x"]) if rows else {}

    async def _query(self, query: str, input_: Any) -> list[dict[str, Any]]:
        """POST /v1/query: the rows of bindings (none when the query is undefined)."""
        body = orjson.dumps({"query": query, "input": input_})
        _, payload = await self.request("POST", "query", body)
        return list(_result(payload, "query") or [])

    async def config(self) -> dict[str, Any]:
        """Who OPA is: the process check's question, with a short deadline of its own, so that a hung OPA
        (stopped, deadlocked) shows within seconds rather than after a write's request timeout."""
        try:
            with anyio.fail_after(CHECK_TIMEOUT):
                _, payload = await self.request("GET", "config")
        except TimeoutError:
            raise OpaUnavailable(f"GET {self.api_url}/config: no answer within {CHECK_TIMEOUT:g} s") from None
        return dict(_result(payload, "config") or {})

    async def status(self) -> dict[str, Any]:
        """What OPA's status plugin last reported (bundles, plugins); 500 when the plugin is off."""
        _, payload = await self.request("GET", "status")
        return dict(_result(payload, "status") or {})

    async def until_closed(self) -> None:
        """Returns when OPA closes a connection that kopa opens to it now and then leaves idle: OPA exited
        (killed, restarted, shut down) or dropped the connection. OpaProcess checks OPA's identity at that
        moment, so that a restart is noticed when it happens, not at the next periodic check.

        The connection asks one GET /health (any answer will do: it is read and dropped) and is then an
        idle keep-alive connection like a pooled one, which an OPA shutting down closes at once; OPA sets
        no idle timeout of its own. It is a connection of its own, outside the request pool, so that its
        close is seen the moment it happens. Raises OpaUnavailable when OPA cannot be reached or the TLS
        handshake fails."""
        origin = self._connections.origin
        try:
            reader, writer = await connect(origin, self._tls(), CONNECT_TIMEOUT)
        except TransportError as exc:
            raise OpaUnavailable(str(exc)[:500]) from None
        try:
            health = origin.base_path.removesuffix("/v1") + "/health"
            token = self._token()
            authorization = f"Authorization: Bearer {token}\r\n" if token else ""
            request = (
                f"GET {health} HTTP/1.1\r\nHost: {origin.netloc}\r\n{authorization}User-Agent: kopa\r\n\r\n"
            )
            writer.write(request.encode("latin-1"))
            while await reader.read(65536):
                pass  # the answer to GET /health, then nothing until OPA closes the connection
        except OSError:  # ssl.SSLError is an OSError
            pass  # reset rather than closed: the same news
        finally:
            writer.close()


def _json_object(payload: bytes) -> dict[str, Any] | None:
    """The answer's body as a JSON object; None when it is not one."""
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def _from_opa_api(payload: bytes) -> bool:
    """Whether a 404's body is OPA's error object (`{"code": "resource_not_found", ...}`), as OPA's API
    answers for an id or a path it does not hold."""
    body = _json_object(payload)
    return body is not None and "code" in body


def _result(payload: bytes, endpoint: str) -> Any:
    """The `result` of an answer of OPA's API. An answer that is not OPA's JSON (a proxy's page) means
    OPA's API is not where kopa asks: OpaUnavailable, as for an OPA that cannot be reached."""
    body = _json_object(payload)
    if body is None:
        raise OpaUnavailable(f"the answer to {endpoint} is not OPA's JSON (is --opa-url OPA's API?)")
    return body.get("result")


def _opa_error(status: int, payload: bytes) -> OpaError:
    body = _json_object(payload)
    if body is None:
        text = payload[:300].decode("utf-8", "replace")
        return OpaError(status, f"http_{status}", text, {"code": f"http_{status}", "message": text})
    return OpaError(status, str(body.get("code", "")), str(body.get("message", "")), body)
