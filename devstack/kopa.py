"""Runs kopa itself as a child process (`python -m app`), the way a user or the kubelet starts it."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from devstack.processes import ManagedProcess


def kopa_process(
    args: Sequence[str | Path], log_path: Path, env: Mapping[str, str] | None = None
) -> ManagedProcess:
    """A not yet started kopa with these command-line arguments; its stdout and stderr go to log_path."""
    return ManagedProcess(
        "kopa", [sys.executable, "-m", "app", *args], log_path, env={"PYTHONUNBUFFERED": "1", **(env or {})}
    )
