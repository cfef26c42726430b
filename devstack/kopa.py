"""Runs kopa itself as a child process (`python -m app`), the way a user or the kubelet starts it."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from devstack.processes import HOST, ManagedProcess, free_port


class KopaProcess(ManagedProcess):
    """kopa with its probe and metrics server on a free loopback port (never kopa's 0.0.0.0 default)."""

    def __init__(
        self, args: Sequence[str | Path], log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        argv = [str(a) for a in args]
        given = [a for a in argv if a.startswith("--health-endpoint")]
        if given:
            address = given[-1].partition("=")[2]
        else:
            address = f"{HOST}:{free_port()}"
            argv.append(f"--health-endpoint={address}")
        host, _, port = address.rpartition(":")
        if host in ("", "0.0.0.0", "[::]"):  # listening on every address: reach it over loopback
            host = HOST
        self.health_url = f"http://{host}:{port}" if address else ""
        env = {"PYTHONUNBUFFERED": "1", **(env or {})}
        self.expected_exit = 0  # what a test expects it to exit with (tests/integration/conftest.py)
        super().__init__("kopa", [sys.executable, "-m", "app", *argv], log_path, env=env)


def kopa_process(
    args: Sequence[str | Path], log_path: Path, env: Mapping[str, str] | None = None
) -> KopaProcess:
    """A not yet started kopa with these command-line arguments; its stdout and stderr go to log_path."""
    return KopaProcess(args, log_path, env)
