"""Readiness and its marker in OPA, against the in-memory OPA of tests/unit/fake_opa.py."""

from __future__ import annotations

import pytest

from app.opa.process import OpaProcess
from app.operations.readiness import MARKER_PATH, Readiness
from tests.unit.fake_opa import FakeOpa

pytestmark = pytest.mark.anyio


def readiness(opa: FakeOpa, pending: int = 0, failing: int = 0) -> Readiness:
    return Readiness(opa, OpaProcess(opa, interval=1.0), pending=lambda: pending, retrying=lambda: failing)


async def test_the_marker_is_written_once_everything_is_in_and_nothing_fails() -> None:
    opa = FakeOpa()
    r = readiness(opa)
    await r.after_batch()
    assert r.ready and await opa.get_data(MARKER_PATH) is not None
    failing = readiness(opa, failing=1)
    failing.loaded_epoch = 0
    assert not failing.ready
    assert "1 changes were not accepted by OPA" in failing.report()["reasons"][0]


async def test_a_marker_that_landed_in_a_new_opa_process_is_taken_back() -> None:
    """The fault suite's finding: OPA restarted between the check and the marker's PUT (a retried PUT
    landed in the new process), which then said "ready" before kopa refilled it."""
    opa = FakeOpa()
    r = readiness(opa)
    await r.process.check()
    opa.restart_before_put = True
    await r.after_batch()
    assert await opa.get_data(MARKER_PATH) is None
    assert not r.ready and r.process.restarts == 1
