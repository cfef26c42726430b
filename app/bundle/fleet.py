"""Which revision of kopa's bundle each OPA runs, from the status reports the OPAs send to kopa.

OPA's status plugin (`status: {service: kopa}` in OPA's configuration) POSTs a report after every bundle
download attempt (a long poll answered 304 included) and whenever a plugin's state changes: its `labels.id`
(one per OPA process) and, under `bundles.kopa`, the revision it activated last (`active_revision`) and the
error of its last attempt (`code`, `message`, `errors`), if any. OPA's own `/health?bundles` only says that
a first activation happened; this says which revision each OPA runs now.

Each OPA is in one state: `failing` when its last report carries an error (an activation OPA refused, a
download that failed), else `current` when it runs kopa's current revision, else `behind` (another revision,
or none yet: a report before the first activation, or one that names no bundle `kopa`).

**Bounded.** An OPA that stops reporting is forgotten once it has been silent for `FORGET_AFTER` (5 min)
or, when longer, three times the longest gap seen between two of its reports (at most `FORGET_AT_MOST`):
an OPA polling every few minutes is not forgotten between two polls. At most `CAPACITY` OPAs are tracked;
past that the one silent longest goes. Ids, messages and error lists are trimmed.

Nothing here does I/O; the time is passed in (Unix seconds). The bundle server records reports and follows
kopa's revision on the main event loop; `/readyz` reads `report()` from the probe server's thread, so reads
never change anything, and they copy the table in one C-level call (`list(...)`) that the main loop cannot
interleave with.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

BUNDLE_NAME = "kopa"
STATES = ("current", "behind", "failing")
# Silence after which an OPA is forgotten (see the module docstring), and the bounds of the table.
FORGET_AFTER = 300.0
FORGET_AT_MOST = 3600.0
GAPS = 3.0
CAPACITY = 10_000
# How often forgotten OPAs are swept out of the table (reads skip them meanwhile).
SWEEP_EVERY = 10.0
# What /readyz lists, and how much of a report is kept.
LISTED = 50
MAX_ID = 256
MAX_MESSAGE = 512
MAX_ERRORS = 5


class ReportError(ValueError):
    """A status report kopa cannot use; str() says why, in one line (the body of the 400)."""


@dataclass(frozen=True)
class Report:
    """What kopa keeps of one status report."""

    id: str
    revision: str  # the revision of kopa's bundle the OPA runs; "" when none
    error: dict[str, Any] | None  # OPA's code, message and (some) errors of its last attempt

    @classmethod
    def parse(cls, body: Any) -> Report:
        """Reads OPA's report (`UpdateRequestV1`); raises ReportError when it is not one."""
        if not isinstance(body, dict):
            raise ReportError("a status report is a JSON object")
        labels = body.get("labels")
        opa_id = labels.get("id") if isinstance(labels, dict) else None
        if not isinstance(opa_id, str) or not opa_id:
            raise ReportError("a status report needs labels.id (the OPA's instance id)")
        if len(opa_id) > MAX_ID:
            raise ReportError(f"labels.id is longer than {MAX_ID} characters")
        bundles = body.get("bundles")
        status = bundles.get(BUNDLE_NAME) if isinstance(bundles, dict) else None
        legacy = body.get("bundle")  # OPA's deprecated single-bundle field
        if status is None and isinstance(legacy, dict) and legacy.get("name") == BUNDLE_NAME:
            status = legacy
        if status is None:
            return cls(opa_id, "", None)
        if not isinstance(status, dict):
            raise ReportError(f"bundles.{BUNDLE_NAME} is not an object")
        revision = status.get("active_revision") or ""
        if not isinstance(revision, str):
            raise ReportError(f"bundles.{BUNDLE_NAME}.active_revision is not a string")
        return cls(opa_id, revision[:MAX_ID], _error_of(status))


def _error_of(status: dict[str, Any]) -> dict[str, Any] | None:
    code, message, errors = status.get("code"), status.get("message"), status.get("errors")
    if not code and not message and not errors:
        return None
    error: dict[str, Any] = {"code": str(code or ""), "message": _trim(str(message or ""))}
    if isinstance(errors, list) and errors:
        error["errors"] = [_trim(_describe(e)) for e in errors[:MAX_ERRORS]]
        if len(errors) > MAX_ERRORS:
            error["more"] = len(errors) - MAX_ERRORS
    return error


def _describe(error: Any) -> str:
    """One of OPA's errors as OPA prints it: `file:row: code: message`."""
    if not isinstance(error, dict):
        return str(error)
    location = error.get("location")
    where = ""
    if isinstance(location, dict) and location.get("file"):
        where = f"{location['file']}:{location.get('row', 0)}: "
    code = f"{error['code']}: " if error.get("code") else ""
    return f"{where}{code}{error.get('message', '')}"


def _trim(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


@dataclass(frozen=True)
class Seen:
    """One OPA as kopa last heard from it. Replaced, never changed, so a reader sees one whole report."""

    report: Report
    at: float  # its last report
    on_revision_since: float  # its first report with the revision it runs
    longest_gap: float  # between two of its reports; 0 before the second

    @property
    def expires(self) -> float:
        return self.at + min(max(FORGET_AFTER, GAPS * self.longest_gap), FORGET_AT_MOST)


class Fleet:
    """The OPAs that report to this kopa, and kopa's revision to compare them with."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._opas: OrderedDict[str, Seen] = OrderedDict()  # the one silent longest first
        self._current: tuple[str, float] = ("", 0.0)  # kopa's revision, and since when
        self._superseded: dict[str, float] = {}  # revision -> when it stopped being kopa's current one
        self._swept = 0.0

    # --- what the bundle server tells it (main event loop) ---

    def revision(self, revision: str, now: float) -> None:
        """kopa's bundle is at `revision` from now on."""
        old = self._current[0]
        if revision == old:
            return
        if old:
            self._superseded[old] = now
        self._superseded.pop(revision, None)
        self._current = (revision, now)

    def record(self, report: Report, now: float) -> None:
        """An OPA reported."""
        before = self._opas.get(report.id)
        if before is None:
            seen = Seen(report, now, now, 0.0)
        else:
            since = before.on_revision_since if before.report.revision == report.revision else now
            seen = Seen(report, now, since, max(before.longest_gap, now - before.at))
        self._opas[report.id] = seen
        self._opas.move_to_end(report.id)
        while len(self._opas) > self.capacity:
            self._opas.popitem(last=False)
        if now - self._swept >= SWEEP_EVERY:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        self._swept = now
        for opa_id, seen in list(self._opas.items()):
            if now >= seen.expires:
                del self._opas[opa_id]
        running = {seen.report.revision for seen in self._opas.values()}
        for revision in [r for r in self._superseded if r not in running]:
            del self._superseded[revision]

    # --- what the metrics and /readyz read (any thread; nothing changes) ---

    def _tracked(self, now: float) -> list[Seen]:
        return [seen for seen in list(self._opas.values()) if now < seen.expires]

    def state(self, seen: Seen) -> str:
        if seen.report.error is not None:
            return "failing"
        return "current" if seen.report.revision == self._current[0] else "behind"

    def lag(self, seen: Seen, now: float) -> float:
        """How long this OPA has run a revision other than kopa's current one (0 when it runs it): since
        kopa moved on from the revision it runs, or since its first report with it, whichever is later."""
        if seen.report.revision == self._current[0]:
            return 0.0
        moved_on = self._superseded.get(seen.report.revision, 0.0)
        return max(now - max(moved_on, seen.on_revision_since), 0.0)

    def counts(self, now: float) -> dict[str, int]:
        """OPAs by state (every state present, 0 included)."""
        return self._counts(self._tracked(now))

    def _counts(self, tracked: list[Seen]) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for seen in tracked:
            counts[self.state(seen)] += 1
        return counts

    def max_lag(self, now: float) -> float:
        """The longest any OPA has been off kopa's current revision; 0 when every one runs it."""
        return max((self.lag(seen, now) for seen in self._tracked(now)), default=0.0)

    def report(self, now: float) -> dict[str, Any]:
        """The `opas` section of /readyz: kopa's revision, the OPAs by state, and up to `LISTED` of them
        (failing first, then behind, the longest behind first)."""
        tracked = self._tracked(now)
        order = {"failing": 0, "behind": 1, "current": 2}
        ranked = sorted(tracked, key=lambda s: (order[self.state(s)], -self.lag(s, now), s.report.id))
        opas = []
        for seen in ranked[:LISTED]:
            entry: dict[str, Any] = {
                "id": seen.report.id,
                "state": self.state(seen),
                "revision": seen.report.revision or None,
                "lastReport": datetime.fromtimestamp(seen.at, UTC).isoformat(timespec="seconds"),
            }
            lag = self.lag(seen, now)
            if lag:
                entry["offRevisionSeconds"] = round(lag, 1)
            if seen.report.error is not None:
                entry["error"] = seen.report.error
            opas.append(entry)
        section: dict[str, Any] = {
            "revision": self._current[0] or None,
            **self._counts(tracked),
            "opas": opas,
        }
        if len(ranked) > LISTED:
            section["notListed"] = len(ranked) - LISTED
        return {"opas": section}
