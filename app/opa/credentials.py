"""How kopa proves itself to OPA and checks OPA's identity: bearer token, TLS trust, client certificate.

The token file is re-read when it changes (a rotated Secret is swapped in by the kubelet), at most once a
second. Nothing here ever puts the token into a message.
"""

from __future__ import annotations

import os
import ssl
import time
from dataclasses import dataclass, field


class CredentialsError(Exception):
    """The OPA connection settings cannot be used; str() is one line naming the setting."""


def ssl_context(
    *, ca_file: str = "", allow_insecure: bool = False, cert_file: str = "", key_file: str = ""
) -> ssl.SSLContext:
    """Verifies OPA's certificate by default, against the system roots plus ca_file."""
    context = ssl.create_default_context()
    if allow_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise CredentialsError(f"invalid --opa-ca-file {ca_file}: {_reason(exc)}") from None
    if cert_file or key_file:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            files = f"{cert_file}, {key_file}"
            raise CredentialsError(
                f"invalid --opa-client-cert-file/--opa-client-key-file {files}: {_reason(exc)}"
            ) from None
    return context


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


@dataclass(frozen=True)
class StaticToken:
    """A token given as a setting (or none); its repr never shows it."""

    token: str = field(repr=False)

    def __call__(self) -> str | None:
        return self.token or None


@dataclass
class TokenFile:
    """The first line of a file, re-read when the file changes (a stat per request: microseconds)."""

    path: str
    check_every: float = 0.0
    _token: str | None = field(default=None, repr=False)
    _stamp: tuple[int, int, int] | None = None
    _checked: float = 0.0

    def load(self) -> str:
        """Reads the token now; raises CredentialsError when the file is missing or empty."""
        try:
            info = os.stat(self.path)
            with open(self.path, encoding="utf-8") as stream:
                line = stream.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CredentialsError(f"invalid --opa-auth-token-file {self.path}: {_reason(exc)}") from None
        if not line:
            raise CredentialsError(f"invalid --opa-auth-token-file {self.path}: the file is empty")
        self._token = line
        self._stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        self._checked = time.monotonic()
        return line

    def __call__(self) -> str | None:
        """The current token; a file that became unreadable keeps the last good one."""
        now = time.monotonic()
        if self._token is None or now - self._checked >= self.check_every:
            self._checked = now
            try:
                info = os.stat(self.path)
                if (info.st_ino, info.st_mtime_ns, info.st_size) != self._stamp:
                    self.load()
            except (OSError, CredentialsError):
                pass
        return self._token
