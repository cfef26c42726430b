"""Runs local servers as child processes that always get cleaned up, and waits for them without sleeping.

Every server (etcd, kube-apiserver, OPA) logs to a file in its work dir, so a failed start can quote the
tail of that log, and the file is still there after the run for a closer look.
"""

from __future__ import annotations

import atexit
import errno
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self, TypeVar

__all__ = [
    "ManagedProcess",
    "ServerStartError",
    "free_port",
    "http_status",
    "ssl_context",
    "wait_until",
]

T = TypeVar("T")

HOST = "127.0.0.1"
# The IPv6 loopback address, for the tests that run the servers over IPv6 (tests/integration/test_ipv6.py).
HOST6 = "::1"

# Lines worth quoting from a failed server's log: Go's "Error:", klog's E/F prefixes, JSON error levels.
_ERROR_LINE = re.compile(r'^(Error|error|fatal|panic)\b|^[EF]\d{4} |"level":"(error|fatal|panic)"')


class ServerStartError(RuntimeError):
    """A server exited or did not become ready in time; the message includes the tail of its log."""


# --- ports -------------------------------------------------------------------------------------------------

_issued_ports: set[int] = set()
_ports_lock = threading.Lock()


def _ephemeral_low() -> int:
    """Start of the kernel's ephemeral range: ports below it are never picked for outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    """Free on both loopback addresses, so a server may take it on either (on ::1 only where it exists)."""
    for family, host in ((socket.AF_INET, HOST), (socket.AF_INET6, HOST6)):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((host, port))
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                continue  # no IPv6 loopback on this machine
            return False
    return True


def free_port() -> int:
    """A loopback TCP port that is free now and was not handed out before in this process.

    Ports come from below the ephemeral range, so while a server is down (a restart test) the kernel does
    not give its port to some client connection's local end, and it can come back on the same port.
    """
    high = min(_ephemeral_low(), 65536)
    low = max(1024, min(15000, high - 2000))
    with _ports_lock:
        for _ in range(200):
            port = random.randrange(low, high)
            if port not in _issued_ports and _bindable(port):
                _issued_ports.add(port)
                return port
        # Fallback: let the kernel choose (inside the ephemeral range).
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, 0))
                port = int(sock.getsockname()[1])
            if port not in _issued_ports:
                _issued_ports.add(port)
                return port


# --- HTTP probes -------------------------------------------------------------------------------------------


def ssl_context(ca_file: Path | str | None) -> ssl.SSLContext:
    """A client TLS context that trusts exactly `ca_file` (the test CA), with hostname checks on."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def http_status(
    url: str, *, ca_file: Path | str | None = None, token: str | None = None, timeout: float = 2.0
) -> tuple[int, bytes]:
    """GETs `url` and returns (status, body) for any HTTP answer; connection errors propagate as OSError."""
    request = urllib.request.Request(url, method="GET")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    context = ssl_context(ca_file) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), bytes(exc.read())


# --- processes ---------------------------------------------------------------------------------------------

_live: set[ManagedProcess] = set()
_live_lock = threading.Lock()


def _kill_leftovers() -> None:
    """Last line of defence at interpreter exit: nothing this module started may outlive the caller."""
    with _live_lock:
        leftovers = list(_live)
    for proc in leftovers:
        proc.kill()


atexit.register(_kill_leftovers)


class ManagedProcess:
    """One server child process: started with `args`, stdout and stderr appended to `log_path`.

    The child runs in its own session so a terminal's Ctrl-C reaches only Python, which then stops the
    servers in order. When started from the main thread on Linux it also gets a parent-death signal, so it
    dies even if Python itself is SIGKILLed.
    """

    def __init__(
        self,
        name: str,
        args: Sequence[str | Path],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stop_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.args = [str(arg) for arg in args]
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._returncode: int | None = None

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} returncode={self.returncode}>"

    # lifecycle

    def start(self) -> Self:
        """Starts the process (it must not be running); returns self for chaining."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self._close()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"\n=== {stamp} starting {self.name}: {' '.join(self.args)}\n".encode())
        log.flush()
        argv = list(self.args)
        setpriv = shutil.which("setpriv")
        if sys.platform == "linux" and setpriv and threading.current_thread() is threading.main_thread():
            # The parent-death signal fires when the *thread* that forked exits, hence main thread only.
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        env = {**os.environ, **self.env} if self.env is not None else None
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=env,
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        self._log = log
        self._returncode = None
        with _live_lock:
            _live.add(self)
        return self

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited after `timeout` s; returns the exit code (None if never
        started). Safe to call more than once."""
        proc = self._proc
        if proc is None:
            return self._returncode
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout if timeout is None else timeout)
                except subprocess.TimeoutExpired:
                    self._note(f"did not exit within {timeout or self.stop_timeout}s of SIGTERM; SIGKILL")
                    proc.kill()
                    proc.wait()
        except BaseException:
            # Interrupted while waiting (Ctrl-C): still leave nothing behind.
            proc.kill()
            proc.wait()
            raise
        finally:
            self._reap()
        return self._returncode

    def kill(self) -> int | None:
        """SIGKILL without grace, as a crash would; returns the exit code."""
        proc = self._proc
        if proc is None:
            return self._returncode
        try:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        finally:
            self._reap()
        return self._returncode

    def wait(self, timeout: float | None = None) -> int:
        """Waits for the process to exit by itself; raises subprocess.TimeoutExpired after `timeout`."""
        if self._proc is None:
            if self._returncode is None:
                raise RuntimeError(f"{self.name} was never started")
            return self._returncode
        code = self._proc.wait(timeout)
        self._reap()
        return code

    # state

    @property
    def pid(self) -> int | None:
        """Process id while running (None before start and after it exited)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        if self._proc is not None:
            return self._proc.poll()
        return self._returncode

    # diagnostics and readiness

    def tail_log(self, n: int = 40) -> str:
        """The last `n` lines of the log, for error messages."""
        return "\n".join(self._log_lines()[-n:])

    def failure(self, message: str, lines: int = 40) -> ServerStartError:
        """A ServerStartError for this process quoting its log tail, and any error lines of its latest run
        that scrolled out of the tail (a usage text or a long stack can push the real cause up)."""
        all_lines = self._log_lines()
        tail = all_lines[-lines:]
        start = max((i for i, line in enumerate(all_lines) if line.startswith("=== ")), default=0)
        earlier = all_lines[start : max(start, len(all_lines) - lines)]
        errors = [line for line in earlier if _ERROR_LINE.search(line)][:10]
        text = f"{self.name}: {message}\n"
        if errors:
            text += "--- error lines above the tail ---\n" + "\n".join(errors) + "\n"
        return ServerStartError(text + f"--- last {lines} lines of {self.log_path} ---\n" + "\n".join(tail))

    def _log_lines(self) -> list[str]:
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 256 * 1024))
                data = log.read()
        except OSError as exc:
            return [f"(no log at {self.log_path}: {exc})"]
        return data.decode("utf-8", errors="replace").splitlines()

    def wait_ready(self, check: Callable[[], T | None], timeout: float, what: str = "ready") -> T:
        """Polls `check` until it returns a truthy value; fails early if the process exits."""
        return wait_until(check, timeout=timeout, what=what, process=self)

    # context manager: `with ManagedProcess(...).start() as p:` stops it on any exit

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # internals

    def _note(self, text: str) -> None:
        if self._log is not None and not self._log.closed:
            self._log.write(f"=== {text}\n".encode())
            self._log.flush()

    def _reap(self) -> None:
        if self._proc is not None:
            self._returncode = self._proc.poll()
            self._note(f"{self.name} exited with {self._returncode}")
        self._proc = None
        self._close()
        with _live_lock:
            _live.discard(self)

    def _close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    process: ManagedProcess | None = None,
    interval: float = 0.02,
    max_interval: float = 0.5,
) -> T:
    """Calls `check` with a growing pause (from `interval` up to `max_interval`) until it returns a truthy
    value, and returns that value.

    Exceptions from `check` count as "not yet" (a server refusing connections while it starts); the last
    one is quoted if the deadline passes. If `process` exits first this fails at once with its log tail.
    """
    deadline = time.monotonic() + timeout
    pause = interval
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
        except Exception as exc:
            last_error = exc
        else:
            if result:
                return result
        if process is not None and not process.running:
            raise process.failure(f"exited with code {process.returncode} before it was {what}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            message = f"not {what} after {timeout:.0f}s{detail}"
            if process is not None:
                raise process.failure(message)
            raise TimeoutError(f"{what}: {message}")
        time.sleep(min(pause, remaining))
        pause = min(pause * 1.5, max_interval)
