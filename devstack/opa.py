"""A real OPA server on loopback, in the two shapes kopa meets: plain HTTP, and the production shape.

The production shape (flavour "secure") is what kube-mgmt's chart deploys: TLS, bearer-token
authentication and a `system.authz` policy that lets anonymous callers reach only the health endpoints.
`OpaHttp` is a deliberately small synchronous client so tests can check OPA's state independently of
kopa's own (asynchronous) client.
"""

from __future__ import annotations

import json
import secrets
import ssl
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from types import EllipsisType, TracebackType
from typing import Any, Literal, Self

from app.http1 import url_host
from devstack.binaries import tool_path
from devstack.certs import TestCA
from devstack.processes import HOST, ManagedProcess, free_port, http_status, ssl_context

__all__ = [
    "AUTHZ_POLICY_ID",
    "Flavour",
    "OpaHttp",
    "OpaHttpError",
    "OpaServer",
    "authz_policy",
    "bundle_config",
    "kopa_service",
    "validation_config",
]

Flavour = Literal["plain", "secure"]

AUTHZ_POLICY_ID = "authz.rego"


def authz_policy(token: str) -> str:
    """The `system.authz` policy (Rego v1) of the secure flavour, admitting `token` to everything."""
    return f"""\
package system.authz

# Written by kopa's devstack: the production shape of OPA next to kopa. Anonymous callers may only GET
# the health endpoints (input.path is the URL path as a list of segments); everything else needs the token.

default allow := false

allow if {{
	input.method == "GET"
	input.path == ["health"]
}}

allow if {{
	input.method == "GET"
	input.path[0] == "health"
	count(input.path) > 1
}}

allow if input.identity == {json.dumps(token)}
"""


def kopa_service(
    kopa_url: str,
    credentials: dict[str, Any],
    ca_file: Path | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """kopa's bundle endpoint as a service in an OPA configuration: `credentials` as OPA takes them (one
    method: a bearer token read from a file, OPA trimming the newline, or `client_tls`), kopa's CA with
    TLS, and `headers` (a token besides a client certificate)."""
    service: dict[str, Any] = {"url": kopa_url, "credentials": credentials}
    if ca_file is not None:
        service["tls"] = {"ca_cert": str(ca_file)}
    if headers:
        service["headers"] = headers
    return service


def bundle_config(
    service: dict[str, Any], bundle: str, polling: dict[str, int], status: dict[str, Any]
) -> str:
    """An OPA configuration that downloads `bundles/<bundle>` from kopa (`service`) with these polling and
    status settings."""
    resource = {"service": "kopa", "resource": f"bundles/{bundle}", "polling": polling}
    return json.dumps({"services": {"kopa": service}, "bundles": {bundle: resource}, "status": status})


def validation_config(service: dict[str, Any]) -> str:
    """The configuration of kopa's validation OPA in bundle mode (README, bundle mode): it downloads the
    candidate bundle from kopa's bundle endpoint (`service`, see `kopa_service`) with long polling, and its
    status plugin is on, which is where kopa reads each candidate's outcome."""
    polling = {"min_delay_seconds": 1, "max_delay_seconds": 1, "long_polling_timeout_seconds": 60}
    return bundle_config(service, "kopa-validation", polling, {"prometheus": True})


class OpaServer:
    """`opa run --server` on a free loopback port, with its files and log in `work_dir` (a new temp dir if
    None, kept afterwards for its log).

    Use as a context manager, or call start() and stop(). kill() and restart() exist for fault tests;
    a restart keeps the port, flags, token and certificate, but OPA's in-memory policies and data are gone,
    as after a real OPA restart.
    """

    def __init__(
        self,
        work_dir: Path | str | None = None,
        flavour: Flavour = "plain",
        *,
        ca: TestCA | None = None,
        log_level: str = "error",
        extra_args: tuple[str, ...] = (),
        start_timeout: float = 30.0,
        host: str = HOST,
    ) -> None:
        if flavour not in ("plain", "secure"):
            raise ValueError(f"flavour must be 'plain' or 'secure', not {flavour!r}")
        self._binary = tool_path("opa")
        self.flavour: Flavour = flavour
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix=f"kopa-opa-{flavour}-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.port = free_port()
        self.token: str | None = None
        self.token_file: Path | None = None
        self.ca_file: Path | None = None
        self.cert_file: Path | None = None
        self.key_file: Path | None = None
        self.authz_file: Path | None = None

        args: list[str | Path] = [
            self._binary,
            "run",
            "--server",
            "--skip-version-check",  # 1.x name of --disable-telemetry, which now logs a deprecation
            f"--addr={url_host(host)}:{self.port}",
            f"--log-level={log_level}",
        ]
        if flavour == "secure":
            ca = ca or TestCA(self.work_dir / "ca")
            self.ca_file = ca.ca_file
            self.cert_file, self.key_file = ca.issue("opa", ips=[host], dns=["localhost"])
            self.token = secrets.token_urlsafe(32)
            self.token_file = self.work_dir / "opa-token"
            self.token_file.write_text(self.token, encoding="utf-8")
            self.token_file.chmod(0o600)
            self.authz_file = self.work_dir / AUTHZ_POLICY_ID
            self.authz_file.write_text(authz_policy(self.token), encoding="utf-8")
            args += [
                f"--tls-cert-file={self.cert_file}",
                f"--tls-private-key-file={self.key_file}",
                "--authentication=token",
                "--authorization=basic",
            ]
        args += list(extra_args)
        if self.authz_file is not None:
            args.append(AUTHZ_POLICY_ID)  # relative to cwd=work_dir, so the policy id is "authz.rego"
        self.url = f"{'https' if flavour == 'secure' else 'http'}://{url_host(host)}:{self.port}"
        self.api_url = f"{self.url}/v1"
        self.process = ManagedProcess("opa", args, self.work_dir / "opa.log", cwd=self.work_dir)

    @classmethod
    def plain(cls, work_dir: Path | str | None = None, **kwargs: Any) -> OpaServer:
        """HTTP without authentication: the development shape."""
        return cls(work_dir, "plain", **kwargs)

    @classmethod
    def validation(cls, work_dir: Path, service: dict[str, Any], **kwargs: Any) -> OpaServer:
        """kopa's validation OPA in bundle mode (see `validation_config`), plain HTTP on loopback."""
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "validation.json").write_text(validation_config(service), "utf-8")
        return cls(work_dir, "plain", extra_args=("--config-file=validation.json",), **kwargs)

    @classmethod
    def secure(cls, work_dir: Path | str | None = None, **kwargs: Any) -> OpaServer:
        """TLS + token authentication + basic authorization: the production shape."""
        return cls(work_dir, "secure", **kwargs)

    def __repr__(self) -> str:
        return f"<OpaServer {self.flavour} {self.url} pid={self.pid}>"

    # lifecycle

    def start(self) -> Self:
        """Starts OPA and returns once GET /health answers 200."""
        self.process.start()
        try:
            self.process.wait_ready(self._healthy, timeout=self.start_timeout, what="healthy (GET /health)")
        except BaseException:
            self.process.stop()
            raise
        return self

    def stop(self) -> None:
        """Graceful stop (SIGTERM, SIGKILL after a deadline). Idempotent."""
        self.process.stop()

    def kill(self) -> None:
        """SIGKILL, as an OOM kill or a crash would."""
        self.process.kill()

    def restart(self) -> None:
        """A new OPA process on the same port with the same flags, started empty."""
        self.process.stop()
        self.start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.running

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # clients

    def http(self, token: str | EllipsisType | None = ...) -> OpaHttp:
        """A test client for this server: trusts its CA, and sends its token unless `token` says otherwise."""
        return OpaHttp(self.url, ca_file=self.ca_file, token=self.token if token is ... else token)

    def _healthy(self) -> bool:
        status, _ = http_status(f"{self.url}/health", ca_file=self.ca_file)
        return status == 200


class OpaHttpError(RuntimeError):
    """OPA answered with a non-2xx status."""

    def __init__(self, method: str, url: str, status: int, body: Any) -> None:
        super().__init__(f"{method} {url}: HTTP {status}: {body!r}")
        self.status = status
        self.body = body


class OpaHttp:
    """Synchronous OPA REST client for tests (stdlib only). Paths are relative to the server URL,
    e.g. "/health" or "/v1/data/x"."""

    def __init__(
        self,
        base_url: str,
        *,
        ca_file: Path | str | None = None,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._context: ssl.SSLContext | None = ssl_context(ca_file) if base_url.startswith("https:") else None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | EllipsisType | None = ...,
        content_type: str | None = None,
    ) -> tuple[int, Any]:
        """Sends one request and returns (status, decoded body) for any HTTP status.

        `body`: bytes or str are sent as they are (text/plain unless `content_type`), anything else as
        JSON. `token`: defaults to the client's; None sends no Authorization header. The reply is parsed
        as JSON when it is JSON, else returned as text (None when empty).
        """
        data: bytes | None = None
        if body is not None:
            if isinstance(body, bytes | str):
                data = body.encode() if isinstance(body, str) else body
                content_type = content_type or "text/plain"
            else:
                data = json.dumps(body).encode()
                content_type = content_type or "application/json"
        url = self.base_url + (path if path.startswith("/") else "/" + path)
        request = urllib.request.Request(url, data=data, method=method.upper())
        if content_type:
            request.add_header("Content-Type", content_type)
        bearer = self.token if token is ... else token
        if bearer:
            request.add_header("Authorization", f"Bearer {bearer}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._context) as response:
                return int(response.status), _decode(response.read(), response.headers.get_content_type())
        except urllib.error.HTTPError as exc:
            with exc:
                return int(exc.code), _decode(exc.read(), exc.headers.get_content_type())

    def _checked(self, method: str, path: str, body: Any = None, content_type: str | None = None) -> Any:
        status, payload = self.request(method, path, body, content_type=content_type)
        if not 200 <= status < 300:
            raise OpaHttpError(method, self.base_url + path, status, payload)
        return payload

    def get_json(self, path: str) -> Any:
        """GET, raising OpaHttpError unless 2xx."""
        return self._checked("GET", path)

    def put(self, path: str, body: Any, content_type: str | None = None) -> Any:
        """PUT (a policy as str, data as JSON-able), raising OpaHttpError unless 2xx."""
        return self._checked("PUT", path, body, content_type)

    def post(self, path: str, body: Any = None, content_type: str | None = None) -> Any:
        """POST (e.g. a query with {"input": ...}), raising OpaHttpError unless 2xx."""
        return self._checked("POST", path, body, content_type)

    def delete(self, path: str) -> Any:
        """DELETE, raising OpaHttpError unless 2xx."""
        return self._checked("DELETE", path)


def _decode(raw: bytes, content_type: str) -> Any:
    if not raw:
        return None
    text = raw.decode("utf-8", errors="replace")
    if "json" in content_type or text.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text
