"""How kopa proves itself to OPA and checks OPA's identity: bearer token, TLS trust, client certificate.

The token file is re-read when it changes (a rotated Secret is swapped in by the kubelet), and so are the
CA and client certificate files, each checked at most once a second. Nothing here ever puts the token into
a message. The bundle endpoint uses the same pieces for its side: `TokenFile` for the token OPAs send, and
`ReloadingTls` for its serving certificate and client CA.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

log = logging.getLogger(__name__)


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
            raise CredentialsError(f"invalid --opa-ca-file {ca_file}: {reason_of(exc)}") from None
    if cert_file or key_file:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            files = f"{cert_file}, {key_file}"
            raise CredentialsError(
                f"invalid --opa-client-cert-file/--opa-client-key-file {files}: {reason_of(exc)}"
            ) from None
    return context


def reason_of(exc: Exception) -> str:
    """Why a file did not load, in one line (an OSError's own words, or the SSL error)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


NOT_HEADER_SAFE = (
    "must be printable ASCII: a line break, a control character or a non-ASCII character cannot go in an "
    "HTTP header"
)


def is_header_safe(token: str) -> bool:
    """Whether a token can be sent in an Authorization header as it is."""
    return all(" " <= c <= "~" for c in token)


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
    setting: str = "--opa-auth-token-file"  # named in errors
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
            raise CredentialsError(f"invalid {self.setting} {self.path}: {reason_of(exc)}") from None
        if not line:
            raise CredentialsError(f"invalid {self.setting} {self.path}: its first line is empty")
        if not is_header_safe(line):
            raise CredentialsError(f"invalid {self.setting} {self.path}: the token {NOT_HEADER_SAFE}")
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


Stamp = tuple[tuple[int, int, int], ...]


@dataclass
class ReloadingTls:
    """A TLS context built from files, built again when one of them changes (cert-manager rotating a CA or a
    certificate), checked at most every `check_every` seconds.

    Calling it returns the current context: the same object until a file changes and loads. A file that
    does not load (half written, not PEM) keeps the previous context, and is logged once per version of the
    file. Used for OPA's client side (`opa_tls`) and for the bundle endpoint's server side.
    """

    files: tuple[str, ...]  # what the context is built from ("" entries ignored)
    build: Callable[[], ssl.SSLContext]  # raises CredentialsError naming the settings
    name: str  # for the log line: "OPA's TLS files"
    check_every: float = 1.0
    _context: ssl.SSLContext | None = field(default=None, repr=False)
    _stamp: Stamp = ()
    _refused: Stamp | None = None
    _checked: float = 0.0

    def _files(self) -> list[str]:
        return [f for f in self.files if f]

    def _current_stamp(self) -> Stamp:
        stamps = []
        for path in self._files():
            info = os.stat(path)  # follows the kubelet's ..data symlink to the file of the moment
            stamps.append((info.st_ino, info.st_mtime_ns, info.st_size))
        return tuple(stamps)

    def load(self) -> ssl.SSLContext:
        """Builds the context now; raises CredentialsError for unusable files (a start-up error)."""
        try:
            stamp = self._current_stamp()
        except OSError:
            stamp = ()  # build() names the missing file
        self._context = self.build()
        self._stamp, self._checked = stamp, time.monotonic()
        return self._context

    def __call__(self) -> ssl.SSLContext:
        """The current context: the same object until a file changes and loads."""
        if self._context is None:
            return self.load()
        now = time.monotonic()
        if not self._files() or now - self._checked < self.check_every:
            return self._context
        self._checked = now
        try:
            stamp = self._current_stamp()
        except OSError:
            return self._context  # in the middle of a swap; look again later
        if stamp in (self._stamp, self._refused):
            return self._context
        try:
            context = self.build()
        except CredentialsError as exc:
            self._refused = stamp
            log.warning("%s; keeping the previous one", exc)
            return self._context
        self._context, self._stamp, self._refused = context, stamp, None
        log.info("%s changed (%s); using them from now on", self.name, ", ".join(self._files()))
        return context


def opa_tls(
    *, ca_file: str = "", allow_insecure: bool = False, cert_file: str = "", key_file: str = ""
) -> ReloadingTls:
    """The TLS context for OPA. A new context means a new connection pool (the OPA client makes a new
    session when it gets a different object)."""
    build = partial(
        ssl_context, ca_file=ca_file, allow_insecure=allow_insecure, cert_file=cert_file, key_file=key_file
    )
    return ReloadingTls((ca_file, cert_file, key_file), build, "OPA's TLS files")
