"""The bundle endpoint (`--bundle-endpoint`): OPA's bundle service API, serving kopa's one bundle.

OPA (1.16, `v1/download/download.go`) asks `GET <service url>/<resource>` with `If-None-Match: <the ETag it
holds>` and `Prefer: modes=snapshot,delta` plus `;wait=N` once long polling is on. Long polling turns on (and
stays on) when an answer carries `Content-Type: application/vnd.openpolicyagent.bundles`, which every answer
here does. The answers:

- none, the handshake failing, without a client certificate signed by `--bundle-tls-ca-file` when given
  (the TLS files are read again when they change: `server_tls`, `ReloadingTls`);
- 401 without the bearer token (`--bundle-token-file`, re-read when it changes; compared in constant time,
  never logged; with a CA and no token file, the certificate alone);
- 503 until the bundle first reflects the cluster (`BundleState.published`): a request is held up to its
  `wait` (or `UNPUBLISHED_HOLD` without one, below OPA's 10 s response-header timeout) in case that happens;
- 304 when the client's ETag is the current revision, after holding the request until the state changes or
  its `wait` ends;
- 200 with a delta bundle when the client prefers deltas, its ETag is a revision still in the log, and only
  data changed since (same roots, same modules: `BundleState.since`); a snapshot otherwise.

`/bundles/kopa-validation` serves the candidate that the validation OPA compiles (`app/bundle/candidate.py`):
the same token, long polling, 304 and snapshots, and every request reported to the `Candidates`, which is
how kopa knows the validation OPA has tried a candidate.

The ETag is the revision, a content digest, so two kopa replicas with the same state answer alike.

It is also the OPAs' status service (OPA's status API, `status: {service: kopa}`): `POST /status` (or
`/status/<partition>`) takes OPA's JSON report, plain or gzip-encoded, with the same token, and records
which revision each OPA runs in a `Fleet` (`app/bundle/fleet.py`): 204, or 401 without the token, 413 past
`MAX_STATUS_BYTES` (decoded), 400 with one line for a body that is not a report.

The server runs on kopa's main event loop, where the state lives; it only reads the state.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import anyio
import orjson
from aiohttp import web

from app.bundle import tarball
from app.bundle.candidate import Candidates
from app.bundle.compiler import RESOURCE as CANDIDATE_RESOURCE
from app.bundle.fleet import BUNDLE_NAME, Fleet, Report, ReportError
from app.bundle.state import BundleState, Revision
from app.http1 import url_host
from app.opa.credentials import CredentialsError, ReloadingTls, reason_of
from app.server.http import WILDCARD_HOSTS, ServerError, dual_stack_socket, ipv4_wildcard_socket

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.openpolicyagent.bundles"
# Longest hold of a long poll, whatever the client asks.
MAX_WAIT = 600.0
# On shutdown, how long requests in flight (long polls) get before they are cancelled.
SHUTDOWN_GRACE = 1.0
# How long a request without `wait` is held while the bundle is not published yet.
UNPUBLISHED_HOLD = 5.0
# Largest status report taken, decompressed (OPA's reports are a few KiB; its errors list is capped).
MAX_STATUS_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Preferences:
    """What OPA's `Prefer` header asks: the bundle modes it takes, and how long it waits (None: no long
    poll)."""

    delta: bool = False
    wait: float | None = None

    @classmethod
    def parse(cls, header: str) -> Preferences:
        delta, wait = False, None
        for part in header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == "modes":
                delta = "delta" in [m.strip() for m in value.split(",")]
            elif name == "wait":
                with contextlib.suppress(ValueError):
                    wait = min(max(float(value), 0.0), MAX_WAIT)
        return cls(delta, wait)


def etag_of(header: str) -> str:
    """The revision an `If-None-Match` names (OPA sends back the ETag as it got it)."""
    value = header.strip()
    value = value.removeprefix("W/")
    return value.strip('"')


@dataclass
class BundleStats:
    """Answers and bytes sent, by kind (snapshot, delta, not_modified, unauthorized, unavailable), and the
    status reports received, by result (accepted, unauthorized, invalid)."""

    responses: Counter[str] = field(default_factory=Counter)
    sent_bytes: Counter[str] = field(default_factory=Counter)
    held: int = 0  # requests held now (long polls, and requests waiting for the first complete load)
    status_reports: Counter[str] = field(default_factory=Counter)


class BundleServer:
    def __init__(
        self,
        state: BundleState,
        host: str,
        port: int,
        *,
        token: Callable[[], str | None] | None,
        tls: Callable[[], ssl.SSLContext] | None = None,
        candidates: Candidates | None = None,
    ) -> None:
        """`token`: the bearer token every request must carry, asked each time; None only with client
        certificates (`server_tls` with a CA), which then alone authenticate the OPAs. `tls`: the current
        TLS context, asked at each handshake (`ReloadingTls`: rotated files are picked up); None: HTTP."""
        self.state = state
        self.candidates = candidates
        self.host = host
        self.port = port
        self.stats = BundleStats()
        self.fleet = Fleet()
        self._token = token
        self._tls = tls
        self._snapshot: tuple[str, bytes] | None = None
        self._deltas: dict[tuple[str, str], bytes] = {}
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_STATUS_BYTES)
        app.router.add_get(f"/bundles/{BUNDLE_NAME}", self.serve)
        if self.candidates is not None:
            app.router.add_get(f"/{CANDIDATE_RESOURCE}", self.serve_candidate)
        app.router.add_post("/status", self.status)
        app.router.add_post("/status/{partition}", self.status)
        return app

    async def start(self) -> None:
        """Binds the address (before kopa's tasks start, so a taken port stops start-up with one line)."""
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE
        )
        await self._runner.setup()
        try:
            await self._start(self._runner)
        except BaseException:
            await self._runner.cleanup()
            raise
        log.info(
            "serving the bundle at %s://%s:%d/bundles/%s",
            self._scheme,
            url_host(self.host),
            self.port,
            BUNDLE_NAME,
        )

    async def run(self) -> None:
        """Serves until cancelled (telling the fleet each new revision), then closes the listener and the
        connections."""
        try:
            await self.state.published.wait()
            while True:
                self.fleet.revision(self.state.current.revision, time.time())
                await self.state.wait_changed()
        finally:
            if self._runner is not None:
                with anyio.CancelScope(shield=True):
                    await self._runner.cleanup()

    @property
    def _scheme(self) -> str:
        return "https" if self._tls is not None else "http"

    def _listening_tls(self) -> ssl.SSLContext | None:
        """The context the listener is made with. The listener keeps it for good, so at each handshake its
        server-name callback (called with or without SNI) hands the connection the current context instead:
        its certificate, and the CA its client certificate is verified against (whether one is asked for
        stays the listener's: it does not change while kopa runs)."""
        if self._tls is None:
            return None
        listening = self._tls()
        tls = self._tls

        def current(connection: ssl.SSLObject, _name: str | None, context: ssl.SSLContext) -> None:
            latest = tls()
            if latest is not context:
                connection.context = latest

        listening.sni_callback = current
        return listening

    async def _start(self, runner: web.AppRunner) -> None:
        tls = self._listening_tls()
        try:
            if self.host in WILDCARD_HOSTS:
                sock = dual_stack_socket(self.port) or ipv4_wildcard_socket(self.port)
                site: web.BaseSite = web.SockSite(runner, sock, ssl_context=tls)
            else:
                site = web.TCPSite(runner, self.host, self.port, ssl_context=tls)
            await site.start()
        except OSError as exc:
            reason = exc.strerror or exc
            raise ServerError(f"cannot serve the bundle on {self.host}:{self.port}: {reason}") from None

    def _authorized(self, request: web.Request) -> bool:
        if self._token is None:
            return True  # client certificates only: the TLS handshake verified this client's
        expected = self._token()
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if not expected or scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), expected.encode())

    def _answer(self, kind: str, status: int, body: bytes = b"", etag: str = "") -> web.Response:
        headers = {"Content-Type": CONTENT_TYPE}
        if etag:
            headers["ETag"] = f'"{etag}"'
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="kopa"'
        self.stats.responses[kind] += 1
        self.stats.sent_bytes[kind] += len(body)
        return web.Response(status=status, body=body, headers=headers)

    async def serve(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._answer("unauthorized", 401, b"a bearer token is required\n")
        prefer = Preferences.parse(request.headers.get("Prefer", ""))
        base = etag_of(request.headers.get("If-None-Match", ""))
        self.stats.held += 1
        try:
            hold = prefer.wait if prefer.wait is not None else UNPUBLISHED_HOLD
            with anyio.move_on_after(hold):
                await self.state.published.wait()
            if not self.state.published.is_set():
                return self._answer("unavailable", 503, b"kopa has not loaded the cluster yet\n")
            current = self.state.current
            if base == current.revision and prefer.wait is not None:
                with anyio.move_on_after(max(prefer.wait - 1.0, 0.0)):
                    while base == current.revision:
                        await self.state.wait_changed()
                        current = self.state.current
        finally:
            self.stats.held -= 1
        if base == current.revision:
            return self._answer("not_modified", 304, etag=current.revision)
        if prefer.delta and base:
            body = self._delta(base, current)
            if body is not None:
                return self._answer("delta", 200, body, current.revision)
        return self._answer("snapshot", 200, self._snapshot_of(current), current.revision)

    async def serve_candidate(self, request: web.Request) -> web.Response:
        candidates = self.candidates
        if candidates is None or not self._authorized(request):
            return self._answer("unauthorized", 401, b"a bearer token is required\n")
        prefer = Preferences.parse(request.headers.get("Prefer", ""))
        base = etag_of(request.headers.get("If-None-Match", ""))
        candidates.arrived(base)
        log.debug("the validation OPA asks (holds %s, offered %s)", base, candidates.current.revision)
        if prefer.wait is not None:
            with anyio.move_on_after(max(prefer.wait - 1.0, 0.0)):
                while base == candidates.current.revision:
                    await candidates.changed()
                    candidates.asked(base)  # the offer may have come back to what it holds
        offer = candidates.current
        if base == offer.revision:
            return self._answer("candidate_not_modified", 304, etag=offer.revision)
        candidates.served(offer.revision)
        return self._answer("candidate", 200, offer.body, offer.revision)

    async def status(self, request: web.Request) -> web.Response:
        """An OPA's status report: which revision it runs, and its bundle error, if any."""
        if not self._authorized(request):
            self.stats.status_reports["unauthorized"] += 1
            return web.Response(
                status=401,
                text="a bearer token is required\n",
                headers={"WWW-Authenticate": 'Bearer realm="kopa"'},
            )
        try:
            # aiohttp decodes the Content-Encoding (gzip, deflate...) as it reads, in bounded chunks, and
            # stops past client_max_size (413): a small compressed body cannot inflate without bound.
            report = Report.parse(orjson.loads(await request.read()))
        except web.HTTPRequestEntityTooLarge as exc:
            self.stats.status_reports["invalid"] += 1
            return web.Response(status=exc.status, text=f"status report too large: {exc.text}\n")
        except web.RequestPayloadError:
            self.stats.status_reports["invalid"] += 1
            encoding = request.headers.get("Content-Encoding", "")[:20]
            return web.Response(status=400, text=f"invalid status report: not readable as {encoding!r}\n")
        except (orjson.JSONDecodeError, ReportError) as exc:
            self.stats.status_reports["invalid"] += 1
            what = "not JSON: " if isinstance(exc, orjson.JSONDecodeError) else ""
            return web.Response(status=400, text=f"invalid status report: {what}{exc}\n")
        self.fleet.record(report, time.time())
        self.stats.status_reports["accepted"] += 1
        return web.Response(status=204)

    def _snapshot_of(self, current: Revision) -> bytes:
        if self._snapshot is None or self._snapshot[0] != current.revision:
            body = tarball.snapshot(current.revision, current.roots, self.state.modules, self.state.data)
            self._snapshot = (current.revision, body)
        return self._snapshot[1]

    def _delta(self, base: str, current: Revision) -> bytes | None:
        key = (base, current.revision)
        if key not in self._deltas:
            operations = self.state.since(base)
            if not operations:
                return None
            if len(self._deltas) >= 16:
                self._deltas.clear()
            self._deltas[key] = tarball.delta(current.revision, current.roots, operations)
        return self._deltas[key]


def server_tls(cert_file: str, key_file: str, ca_file: str = "") -> ssl.SSLContext:
    """The bundle endpoint's TLS context: its certificate and, with `ca_file`, a client certificate required
    and verified against that CA alone. Not `create_default_context`: for client authentication it trusts
    the system's CAs too, which would admit any publicly issued client certificate. CredentialsError names
    the settings when the files do not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(
            f"invalid --bundle-tls-cert-file/--bundle-tls-key-file {cert_file}, {key_file}: {reason_of(exc)}"
        ) from None
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise CredentialsError(f"invalid --bundle-tls-ca-file {ca_file}: {reason_of(exc)}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def reloading_server_tls(cert_file: str, key_file: str, ca_file: str = "") -> ReloadingTls:
    """`server_tls`, built again when one of its files changes (checked at most once a second, at a
    handshake); loaded now, so unusable files stop start-up."""
    tls = ReloadingTls(
        (cert_file, key_file, ca_file),
        partial(server_tls, cert_file, key_file, ca_file),
        "the bundle endpoint's TLS files",
    )
    tls.load()
    return tls
