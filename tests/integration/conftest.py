"""Fixtures that run kopa against the real servers of the session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devstack.kopa import KopaProcess, kopa_process
from devstack.kube import KubeCluster

KopaFactory = Callable[..., KopaProcess]


@pytest.fixture
def run_kopa(kube: KubeCluster, tmp_path: Path) -> Iterator[KopaFactory]:
    """Factory: run_kopa(*args) starts kopa with the admin kubeconfig plus args; stopped after the test.

    A kopa that exits with an error or logs a traceback fails the test at teardown, whatever it asserted;
    a test that kills one says so with its `expected_exit` (-9 after SIGKILL).
    """
    started: list[KopaProcess] = []

    def start(*args: str, kubeconfig: Path | None = None, expect_exit: int = 0) -> KopaProcess:
        """expect_exit: the exit code the test expects (2 for a start-up error); anything else fails it."""
        log = tmp_path / f"kopa-{len(started)}.log"
        process = kopa_process(
            [f"--kubeconfig={kubeconfig or kube.admin_kubeconfig}", "--log-level=debug", *args], log
        )
        process.expected_exit = expect_exit
        started.append(process.start())
        return process

    yield start
    problems = []
    for process in started:
        code = process.stop()
        output = process.log_path.read_text(errors="replace")
        if code not in (process.expected_exit, None):
            problems.append(f"kopa exited with {code}:\n{process.tail_log(30)}")
        if "Traceback" in output:
            problems.append(f"kopa logged a traceback:\n{process.tail_log(60)}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
