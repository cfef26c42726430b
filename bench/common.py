"""What every benchmark uses: small async clients for the API server and OPA, a poller, statistics.

The bench talks to the servers on aiohttp + orjson, the same HTTP stack as kopa, and never through kopa.
All timestamps are time.monotonic() (CLOCK_MONOTONIC), which is one clock for every process on the
machine, so times taken by the helper processes (updater, decision client) compare with the bench's own.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson

T = TypeVar("T")

JSON = dict[str, Any]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float], scale: float = 1.0, digits: int = 4) -> dict[str, float | int]:
    """count, p50, p90, p99, max and mean of values (times `scale`, e.g. 1000 for ms)."""
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "p50": round(percentile(values, 50) * scale, digits),
        "p90": round(percentile(values, 90) * scale, digits),
        "p99": round(percentile(values, 99) * scale, digits),
        "max": round(max(values) * scale, digits),
        "mean": round(sum(values) / len(values) * scale, digits),
    }


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def polynomial_fit(points: Sequence[tuple[float, float]], degree: int) -> list[float] | None:
    """Least-squares coefficients [a, b, ...] of y = a + b x + c x^2 ... through (x, y) points; None when
    fewer distinct x than coefficients. Solved from the normal equations (a few points, small degree)."""
    size = degree + 1
    if len({x for x, _ in points}) < size:
        return None
    rows = [[sum(x ** (i + j) for x, _ in points) for j in range(size)] for i in range(size)]
    rhs = [sum(y * x**i for x, y in points) for i in range(size)]
    for col in range(size):  # Gaussian elimination with partial pivoting
        pivot = max(range(col, size), key=lambda r: abs(rows[r][col]))
        rows[col], rows[pivot] = rows[pivot], rows[col]
        rhs[col], rhs[pivot] = rhs[pivot], rhs[col]
        for r in range(col + 1, size):
            factor = rows[r][col] / rows[col][col]
            rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col], strict=True)]
            rhs[r] -= factor * rhs[col]
    coefficients = [0.0] * size
    for col in reversed(range(size)):
        known = sum(rows[col][k] * coefficients[k] for k in range(col + 1, size))
        coefficients[col] = (rhs[col] - known) / rows[col][col]
    return coefficients


def growth_exponent(points: Sequence[tuple[float, float]]) -> float | None:
    """k of a power law y = C x^k through (x, y) points, by least squares on log y against log x: about 1
    when y grows in proportion to x, 2 when it grows with its square, below 1 when a fixed cost dominates.
    None with fewer than two distinct x, or a y that is not positive."""
    if any(x <= 0 or y <= 0 for x, y in points):
        return None
    fit = polynomial_fit([(math.log(x), math.log(y)) for x, y in points], 1)
    return None if fit is None else fit[1]


def proc_memory(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS) and VmRSS of a process, in bytes, from /proc/<pid>/status."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            found[key] = int(value.split()[0]) * 1024
    return found


def load_average() -> float:
    """The machine's 1-minute load average: other work on the machine skews every figure."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class KubeApi:
    """The API server as the bench needs it: create, merge-patch, list in pages (admin token)."""

    def __init__(self, server: str, token: str, ca_file: Path | str, connections: int = 32) -> None:
        self.server = server.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._ssl = ssl.create_default_context(cafile=str(ca_file))
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeApi:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl, limit=self._connections),
            timeout=aiohttp.ClientTimeout(total=120),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use KubeApi as an async context manager"
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else orjson.dumps(body)
            headers["Content-Type"] = content_type
        async with self.session.request(
            method, self.server + path, data=data, headers=headers, params=params
        ) as resp:
            return resp.status, await resp.read()

    async def checked(self, method: str, path: str, body: Any = None, **kwargs: Any) -> JSON:
        status, payload = await self.request(method, path, body, **kwargs)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {payload[:300]!r}")
        doc = orjson.loads(payload) if payload else {}
        return doc if isinstance(doc, dict) else {}

    async def ensure_namespace(self, name: str) -> None:
        status, payload = await self.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        )
        if status not in (201, 409):
            raise RuntimeError(f"creating namespace {name}: HTTP {status}: {payload[:300]!r}")

    async def create_all(
        self, objects: Sequence[JSON], path_of: Callable[[JSON], str], limit: int = 24
    ) -> None:
        """Creates every object, `limit` requests at a time; an object that exists already is kept."""
        gate = asyncio.Semaphore(limit)

        async def create(obj: JSON) -> None:
            async with gate:
                status, payload = await self.request("POST", path_of(obj), obj)
            if status not in (201, 409):
                raise RuntimeError(f"creating {path_of(obj)}: HTTP {status}: {payload[:300]!r}")

        await asyncio.gather(*(create(obj) for obj in objects))

    async def list_all(self, path: str, field_selector: str = "", page_size: int = 500) -> list[JSON]:
        params = {"limit": str(page_size)}
        if field_selector:
            params["fieldSelector"] = field_selector
        items: list[JSON] = []
        while True:
            page = await self.checked("GET", path, params=params)
            items += page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items
            params["continue"] = token


class Opa:
    """OPA's REST API for the bench: queries, data, policies, its own /metrics."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")  # the server URL, without /v1
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Opa:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=8), timeout=aiohttp.ClientTimeout(total=60)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use Opa as an async context manager"
        return self._session

    async def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"
    ) -> tuple[int, bytes]:
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self.session.request(method, self.url + path, data=body, headers=headers) as resp:
            return resp.status, await resp.read()

    async def query(self, query: str) -> Any:
        """The value of `x` in an ad-hoc query `x := ...`, or None when undefined or OPA is down."""
        try:
            status, payload = await self.request("POST", "/v1/query", orjson.dumps({"query": query}))
        except (aiohttp.ClientError, OSError):
            return None
        if status != 200:
            return None
        rows = orjson.loads(payload).get("result") or []
        return rows[0].get("x") if rows else None

    async def data(self, path: str, body: bytes | None = None) -> Any:
        """data.<path> (GET, or POST with an input document), or None when undefined or unreachable."""
        try:
            status, payload = await self.request("POST" if body else "GET", f"/v1/data/{path}", body)
        except (aiohttp.ClientError, OSError):
            return None
        if status != 200:
            return None
        return orjson.loads(payload).get("result")

    async def healthy(self) -> bool:
        try:
            status, _ = await self.request("GET", "/health")
        except (aiohttp.ClientError, OSError):
            return False
        return status == 200

    async def put_policy(self, policy_id: str, text: str) -> None:
        status, payload = await self.request("PUT", f"/v1/policies/{policy_id}", text.encode(), "text/plain")
        if status != 200:
            raise RuntimeError(f"PUT policy {policy_id}: HTTP {status}: {payload[:300]!r}")

    async def request_metrics(self) -> list[RequestCount]:
        """OPA's own count and total time of the requests it served, per handler, method and status."""
        _, payload = await self.request("GET", "/metrics")
        found: dict[tuple[str, str, int], RequestCount] = {}
        for line in payload.decode().splitlines():
            match = _REQUEST_METRIC.match(line)
            if match is None:
                continue
            labels = dict(_LABEL.findall(match.group("labels")))
            key = (labels.get("handler", ""), labels.get("method", "").lower(), int(labels.get("code", 0)))
            sample = found.setdefault(key, RequestCount(*key))
            if match.group("kind") == "count":
                sample.count = int(float(match.group("value")))
            else:
                sample.seconds = float(match.group("value"))
        return list(found.values())

    async def writes(self) -> int:
        """Write requests (PUT, PATCH, DELETE) OPA counted on /v1/data and /v1/policies (its /metrics)."""
        return (await self.write_time()).count

    async def write_time(self) -> RequestCount:
        """Write requests (PUT, PATCH, DELETE) on /v1/data and /v1/policies: how many OPA served, and the
        seconds it spent on them from reading the request to answering (its /metrics)."""
        return summed(
            await self.request_metrics(),
            RequestCount("v1/data+v1/policies", "write", 0),
            lambda s: s.handler in ("v1/data", "v1/policies") and s.method in ("put", "patch", "delete"),
        )


_REQUEST_METRIC = re.compile(
    r"^http_request_duration_seconds_(?P<kind>count|sum)\{(?P<labels>[^}]*)\} (?P<value>\S+)$"
)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class RequestCount:
    """One series of OPA's http_request_duration_seconds: requests served and their total seconds."""

    handler: str
    method: str
    code: int
    count: int = 0
    seconds: float = 0.0


def summed(
    metrics: list[RequestCount], total: RequestCount, keep: Callable[[RequestCount], bool]
) -> RequestCount:
    """`total` with the counts and seconds of the series that `keep` keeps added to it."""
    for s in metrics:
        if keep(s):
            total.count += s.count
            total.seconds += s.seconds
    return total


@dataclass(frozen=True)
class Seen:
    """A poll that saw the condition: when it was sent and answered, and when the poll before it was sent.

    The condition became true in OPA after `previous_sent` and at the latest when `received`; the bench
    reports `received` (an upper bound) and `received - previous_sent` as the resolution.
    """

    value: Any
    previous_sent: float
    sent: float
    received: float

    @property
    def resolution(self) -> float:
        return self.received - self.previous_sent


async def poll_until(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    interval: float = 0.01,
    within: float = 120.0,
    what: str = "condition",
) -> Seen:
    """Calls probe() every `interval` seconds (start to start) until done(result), for `within` seconds."""
    deadline = time.monotonic() + within
    previous = time.monotonic()
    while True:
        sent = time.monotonic()
        value = await probe()
        received = time.monotonic()
        if done(value):
            return Seen(value, previous, sent, received)
        if received > deadline:
            raise TimeoutError(f"{what}: not reached after {within:.0f}s (last value {value!r:.200})")
        previous = sent
        await asyncio.sleep(max(0.0, sent + interval - time.monotonic()))
