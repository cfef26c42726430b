"""The OPAs' status reports as kopa keeps them (app/bundle/fleet.py): parsing OPA's report, the states, how
long an OPA has been off kopa's revision, forgetting silent OPAs, and the bounds. The reports below are real:
captured from OPA 1.16.1 reporting to a test bundle server (its `metrics` left out)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from app.bundle import fleet as fleet_module
from app.bundle.fleet import FORGET_AFTER, FORGET_AT_MOST, LISTED, Fleet, Report, ReportError

T0 = 1_800_000_000.0

# An OPA that activated rev1, then refused rev2: a module pushed into it through its API calls a function
# rev2 no longer defines.
REFUSED: dict[str, Any] = {
    "labels": {"id": "0acbbb59-ea52-42e5-af9e-3891d451dda3", "version": "1.16.1"},
    "bundles": {
        "kopa": {
            "name": "kopa",
            "active_revision": "rev1",
            "last_successful_activation": "2026-12-01T18:47:53.927984443Z",
            "type": "snapshot",
            "size": 194,
            "last_successful_download": "2026-12-01T18:47:59.563524947Z",
            "last_successful_request": "2026-12-01T18:47:59.563524947Z",
            "last_request": "2026-12-01T18:47:59.563524947Z",
            "code": "bundle_error",
            "message": "error(s) occurred while compiling module(s)",
            "errors": [
                {
                    "code": "rego_type_error",
                    "message": "undefined function data.team.x.double",
                    "location": {"file": "mine", "row": 3, "col": 9},
                }
            ],
        }
    },
    "plugins": {"bundle": {"state": "OK"}, "discovery": {"state": "OK"}, "status": {"state": "OK"}},
}
# An OPA whose first download failed: no revision yet.
UNREACHABLE: dict[str, Any] = {
    "labels": {"id": "93c4898a-58ae-44f3-86ab-f3473b48320a", "version": "1.16.1"},
    "bundles": {
        "kopa": {
            "name": "kopa",
            "last_successful_activation": "0001-01-01T00:00:00Z",
            "last_successful_download": "0001-01-01T00:00:00Z",
            "last_successful_request": "0001-01-01T00:00:00Z",
            "last_request": "2026-12-01T18:47:02.718059577Z",
            "code": "bundle_error",
            "message": 'request failed: Get "http://127.0.0.1:18999/bundles/kopa": dial tcp 127.0.0.1:18999: '
            "connect: connection refused",
        }
    },
    "plugins": {"bundle": {"state": "OK"}, "discovery": {"state": "OK"}, "status": {"state": "OK"}},
}


def running(opa_id: str, revision: str) -> Report:
    return Report(opa_id, revision, None)


def test_opas_reports_are_read() -> None:
    refused = Report.parse(REFUSED)
    assert refused.id == "0acbbb59-ea52-42e5-af9e-3891d451dda3"
    assert refused.revision == "rev1"
    assert refused.error == {
        "code": "bundle_error",
        "message": "error(s) occurred while compiling module(s)",
        "errors": ["mine:3: rego_type_error: undefined function data.team.x.double"],
    }
    unreachable = Report.parse(UNREACHABLE)
    assert (unreachable.revision, unreachable.error and unreachable.error["code"]) == ("", "bundle_error")

    fine = copy.deepcopy(REFUSED)
    for key in ("code", "message", "errors"):
        del fine["bundles"]["kopa"][key]
    assert Report.parse(fine) == Report(refused.id, "rev1", None)
    # Before the bundle plugin reported anything (OPA's first report), and OPA's old single-bundle field.
    assert Report.parse({"labels": {"id": "a"}, "plugins": {}}) == Report("a", "", None)
    legacy = {"labels": {"id": "a"}, "bundle": {"name": "kopa", "active_revision": "r"}}
    assert Report.parse(legacy) == Report("a", "r", None)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([], "a status report is a JSON object"),
        ({"bundles": {}}, "labels.id"),
        ({"labels": {"id": ""}}, "labels.id"),
        ({"labels": {"id": "x" * 300}}, "longer than 256"),
        ({"labels": {"id": "a"}, "bundles": {"kopa": "x"}}, "bundles.kopa is not an object"),
        ({"labels": {"id": "a"}, "bundles": {"kopa": {"active_revision": 1}}}, "active_revision"),
    ],
)
def test_what_is_not_a_report_says_why(body: Any, reason: str) -> None:
    with pytest.raises(ReportError, match=reason):
        Report.parse(body)


def test_long_errors_are_trimmed() -> None:
    body = copy.deepcopy(REFUSED)
    status = body["bundles"]["kopa"]
    status["message"] = "m" * 5000
    status["errors"] = [{"code": "c", "message": "x" * 5000}] * 12
    error = Report.parse(body).error
    assert error is not None
    assert len(error["message"]) <= fleet_module.MAX_MESSAGE
    assert len(error["errors"]) == fleet_module.MAX_ERRORS and error["more"] == 7
    assert all(len(e) <= fleet_module.MAX_MESSAGE for e in error["errors"])


def test_each_opa_is_current_behind_or_failing() -> None:
    fleet = Fleet()
    fleet.revision("rev2", T0)
    fleet.record(running("a", "rev2"), T0)
    fleet.record(running("b", "rev1"), T0)
    fleet.record(Report.parse(REFUSED), T0)
    fleet.record(Report("d", "", None), T0)  # no revision yet
    assert fleet.counts(T0 + 1) == {"current": 1, "behind": 2, "failing": 1}
    section = fleet.report(T0 + 1)["opas"]
    assert section["revision"] == "rev2"
    assert [(o["id"][:1], o["state"]) for o in section["opas"]] == [
        ("0", "failing"),
        ("b", "behind"),
        ("d", "behind"),
        ("a", "current"),
    ]
    assert section["opas"][0]["error"]["errors"] == [
        "mine:3: rego_type_error: undefined function data.team.x.double"
    ]
    assert section["opas"][2]["revision"] is None
    assert "offRevisionSeconds" not in section["opas"][3]

    fleet.revision("rev3", T0 + 2)  # kopa moves on: nobody is current until they report rev3
    assert fleet.counts(T0 + 2) == {"current": 0, "behind": 3, "failing": 1}
    fleet.record(running("a", "rev3"), T0 + 3)
    assert fleet.counts(T0 + 3)["current"] == 1


def test_the_lag_counts_from_when_kopa_moved_on_or_the_opa_got_there() -> None:
    fleet = Fleet()
    fleet.revision("rev1", T0)
    fleet.record(running("a", "rev1"), T0 + 1)
    assert fleet.max_lag(T0 + 5) == 0.0
    fleet.revision("rev2", T0 + 10)
    assert fleet.max_lag(T0 + 25) == 15.0  # off since kopa moved on, though its last report was earlier
    fleet.record(running("a", "rev1"), T0 + 30)  # still behind: the lag keeps counting
    assert fleet.max_lag(T0 + 40) == 30.0
    fleet.record(running("b", "rev0"), T0 + 40)  # a revision this kopa never had: since its first report
    assert fleet.report(T0 + 45)["opas"]["opas"][0]["offRevisionSeconds"] == 35.0
    fleet.record(running("a", "rev2"), T0 + 50)
    fleet.record(running("b", "rev2"), T0 + 50)
    assert fleet.max_lag(T0 + 60) == 0.0
    fleet.revision("rev1", T0 + 70)  # content back where it was: rev1 is current again
    fleet.record(running("c", "rev1"), T0 + 71)
    assert fleet.counts(T0 + 72) == {"current": 1, "behind": 2, "failing": 0}
    assert fleet.max_lag(T0 + 80) == 10.0


def test_silent_opas_are_forgotten() -> None:
    fleet = Fleet()
    fleet.revision("rev1", T0)
    fleet.record(running("gone", "rev1"), T0)
    fleet.record(running("slow", "rev1"), T0)
    fleet.record(running("slow", "rev1"), T0 + 250)  # reports every 250 s: kept for 750 s of silence
    assert fleet.counts(T0 + FORGET_AFTER - 1)["current"] == 2
    assert fleet.counts(T0 + FORGET_AFTER)["current"] == 1  # reads skip it at once
    assert fleet.counts(T0 + 250 + 749)["current"] == 1
    assert fleet.counts(T0 + 250 + 750)["current"] == 0
    fleet.record(running("new", "rev1"), T0 + 400)  # a write sweeps the table
    assert set(fleet._opas) == {"slow", "new"}
    # However long its gaps, an OPA silent for an hour is forgotten.
    fleet.record(running("slow", "rev1"), T0 + 250 + 3 * FORGET_AT_MOST)
    assert fleet.counts(T0 + 250 + 4 * FORGET_AT_MOST)["current"] == 0


def test_the_table_and_the_list_are_bounded() -> None:
    fleet = Fleet(capacity=100)
    fleet.revision("rev1", T0)
    for i in range(150):
        fleet.record(running(f"opa-{i:03}", "rev1" if i % 2 else "rev0"), T0 + i)
    assert len(fleet._opas) == 100
    assert "opa-049" not in fleet._opas and "opa-050" in fleet._opas  # the ones silent longest went
    section = fleet.report(T0 + 200)["opas"]
    assert (section["current"], section["behind"]) == (50, 50)
    assert len(section["opas"]) == LISTED and section["notListed"] == 100 - LISTED
    assert all(o["state"] == "behind" for o in section["opas"])
