"""HTTP/1.1 basics shared by kopa's two hand-written clients: the OPA transport (app/opa/transport.py) and
the Kubernetes watch stream (app/kube/stream.py). aiohttp serves every other request; these two exist
because kopa's path from a watch event to OPA is latency-bound (docs/architecture.md, "Adapters").
`url_host` serves every adapter that puts a host into a URL or a log line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit


def url_host(host: str) -> str:
    """A host as a URL writes it: an IPv6 address in brackets (RFC 3986), anything else as it is."""
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class Origin:
    """Where the connections go: scheme, host, port, and what a request line and Host header need."""

    https: bool
    host: str
    port: int
    netloc: str
    base_path: str

    @property
    def authority(self) -> str:
        """host:port, always with the port (a CONNECT request's target)."""
        return f"{url_host(self.host)}:{self.port}"

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        https = parts.scheme == "https"
        netloc = parts.netloc.rpartition("@")[2]  # never a userinfo part in the Host header
        return cls(
            https=https,
            host=parts.hostname or "localhost",
            port=parts.port or (443 if https else 80),
            netloc=netloc,
            base_path=parts.path.rstrip("/"),
        )


def request_head(request_line: str, fields: Mapping[str, str]) -> bytes:
    """A request's head: its request line, its header fields, the blank line that ends it."""
    lines = [request_line, *(f"{name}: {value}" for name, value in fields.items())]
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n"


def parse_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    """The version, status and header fields (lower-case names) of an answer's head (ending in a blank
    line). ValueError when it is not a well-formed HTTP/1.x answer."""
    status_line, *header_lines = head.rstrip(b"\r\n").decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise ValueError(f"not an HTTP/1.x answer: {status_line[:80]!r}")
    fields: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"malformed header line {line[:80]!r}")
        name, value = name.strip().lower(), value.strip()
        if name == "content-length" and fields.get(name, value) != value:
            raise ValueError("conflicting Content-Length headers")
        fields[name] = f"{fields[name]}, {value}" if name in fields and name != "content-length" else value
    return version, int(rest[:3]), fields


def keeps_alive(version: str, fields: dict[str, str]) -> bool:
    """Whether the connection can carry another request after this answer."""
    connection = fields.get("connection", "").lower()
    return "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection


def is_chunked(fields: dict[str, str]) -> bool:
    """Whether the body is chunked; ValueError for a transfer coding kopa does not decode."""
    coding = fields.get("transfer-encoding")
    if coding is None:
        return False
    if coding.lower().rsplit(",", 1)[-1].strip() != "chunked":
        raise ValueError(f"unsupported transfer coding {coding!r}")
    return True


def content_length(fields: dict[str, str]) -> int | None:
    length = fields.get("content-length")
    if length is None:
        return None
    size = int(length)
    if size < 0:
        raise ValueError(f"invalid Content-Length {length!r}")
    return size
