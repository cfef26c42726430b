"""One compile of a whole set of modules, by the validation OPA's own bundle plugin.

Pushing modules into the validation OPA one PUT at a time makes it compile everything it holds on every PUT:
loading N modules costs N compiles (quadratic, as push mode is for every OPA). A bundle is compiled once when
it is activated, so kopa hands the validation OPA the candidate as a bundle (`Candidates`, served at
`/bundles/kopa-validation` by the bundle server) and reads the outcome from that OPA's status: active at the
candidate's revision means it compiles; otherwise its errors name the files (the module ids) that fail.

The validation OPA must therefore download that bundle and have its status plugin on; README "Bundle mode"
gives its configuration. Outcomes are kept by revision (a content digest), so a set that was compiled once
is never compiled again (after a validation OPA restart, for one).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import anyio

from app.bundle import tarball
from app.bundle.candidate import Candidates, Offer
from app.bundle.settle import Failure
from app.opa.client import OpaUnavailable
from app.replication.analysis import rule_paths

Path = tuple[str, ...]

log = logging.getLogger(__name__)

RESOURCE = "bundles/kopa-validation"
# How long the validation OPA gets to download and activate one candidate (a few hundred modules take it
# about a second; a failed activation makes it wait up to its max_delay_seconds before it asks again).
COMPILE_TIMEOUT = 30.0
# Outcomes kept, by revision.
KEPT = 64


class ValidationApi(Protocol):
    """What the compiler needs of the validation OPA."""

    async def config(self) -> dict[str, Any]: ...

    async def status(self) -> dict[str, Any]: ...

    async def get_policy(self, policy_id: str) -> dict[str, Any] | None: ...


def revision_of(modules: Mapping[str, str]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for module_id in sorted(modules):
        for part in (module_id.encode(), modules[module_id].encode()):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.hexdigest()


def offer_of(modules: Mapping[str, str], revision: str | None = None) -> Offer:
    revision = revision or revision_of(modules)
    return Offer(revision, tarball.snapshot(revision, [""], modules, {}))


def failures_of(bundle: Mapping[str, Any], files: Mapping[str, str]) -> list[Failure]:
    """The validation OPA's bundle status as failures by module id (`files`: bundle file -> module id), with
    each error's file given as the module id, as OPA names it in answer to a PUT."""
    found: list[Failure] = []
    for given in bundle.get("errors") or []:
        if not isinstance(given, dict):
            continue
        location = given.get("location")
        location = location if isinstance(location, dict) else {}
        module_id = files.get(str(location.get("file")))
        named = {**given, "location": {**location, "file": module_id}} if module_id is not None else given
        found.append((module_id, named))
    if not found:
        found.append(
            (None, {"code": str(bundle.get("code") or "bundle_error"), "message": bundle.get("message")})
        )
    return found


class BundleCompiler:
    def __init__(self, opa: ValidationApi, *, timeout: float = COMPILE_TIMEOUT) -> None:
        self.candidates = Candidates(offer_of({}))
        self._opa = opa
        self._timeout = timeout
        self._outcomes: OrderedDict[str, list[Failure]] = OrderedDict()
        self._bundle: str | None = None  # the name the validation OPA gives kopa's candidate bundle
        self._complaint = ""  # the last configuration problem logged, so it is logged once
        self._lock = anyio.Lock()
        self.compiles = 0

    async def compile(self, modules: Mapping[str, str]) -> list[Failure]:
        """The errors of the set, [] when it compiles. Raises OpaUnavailable when the validation OPA cannot
        say (unreachable, or not configured to download the candidate)."""
        revision = revision_of(modules)
        known = self._outcomes.get(revision)
        if known is not None:
            return known
        async with self._lock:
            bundle = await self._bundle_name()
            await self._have_tried(modules, revision)
            status = await self._opa.status()
        self.compiles += 1
        state = (status.get("bundles") or {}).get(bundle) or {}
        if state.get("active_revision") == revision:
            failures: list[Failure] = []
        else:
            files = {name: module_id for module_id, name in tarball.module_files(sorted(modules)).items()}
            failures = failures_of(state, files)
        log.debug("candidate %s (%d modules): %d errors", revision, len(modules), len(failures))
        self._outcomes[revision] = failures
        while len(self._outcomes) > KEPT:
            self._outcomes.popitem(last=False)
        return failures

    async def rule_paths(self, modules: Mapping[str, str], ids: Sequence[str]) -> dict[str, list[Path]]:
        """Where the rules of the modules `ids` of the set `modules` (which compiles) are, from the ASTs the
        validation OPA compiled: it is made to hold exactly `modules` first when it holds anything else."""
        if not ids:
            return {}
        async with self._lock:
            bundle = await self._bundle_name()
            files = tarball.module_files(sorted(modules))
            held = [await self._opa.get_policy(bundle + files[i]) for i in ids]
            if any(p is None or p.get("raw") != modules[i] for p, i in zip(held, ids, strict=True)):
                await self._have_tried(modules, revision_of(modules))
                held = [await self._opa.get_policy(bundle + files[i]) for i in ids]
        policies = [
            {**p, "id": i} for p, i in zip(held, ids, strict=True) if p and p.get("raw") == modules[i]
        ]
        if len(policies) < len(ids):
            raise OpaUnavailable("the validation OPA does not hold the modules kopa had it compile")
        return rule_paths(policies)

    def rest(self, modules: Mapping[str, str]) -> None:
        """Offers a set known to compile (what the bundle holds), so that the validation OPA stops retrying
        a failed candidate and holds a set the next compile differs little from."""
        revision = revision_of(modules)
        self._outcomes.setdefault(revision, [])
        if revision != self.candidates.current.revision:
            self.candidates.offer(offer_of(modules, revision))

    async def _have_tried(self, modules: Mapping[str, str], revision: str) -> None:
        """Offers the set (its bundle is built only when it is not the offer already) and returns once the
        validation OPA has tried it; OpaUnavailable when it does not within the timeout."""
        if revision != self.candidates.current.revision:
            self.candidates.offer(offer_of(modules, revision))
        with anyio.move_on_after(self._timeout):
            await self.candidates.tried(revision)
        if not self.candidates.tried_now(revision):
            self._bundle = None  # its configuration may have changed: read it again next time
            raise OpaUnavailable(
                f"the validation OPA did not try kopa's candidate bundle within {self._timeout:.0f} s"
            )

    async def _bundle_name(self) -> str:
        if self._bundle is None:
            try:
                self._bundle = bundle_for(await self._opa.config())
            except ConfigurationProblem as exc:
                if str(exc) != self._complaint:
                    log.error("%s", exc)
                    self._complaint = str(exc)
                raise OpaUnavailable(str(exc)) from None
            self._complaint = ""
        return self._bundle


class ConfigurationProblem(Exception):
    """The validation OPA is not configured to try kopa's candidates."""


def bundle_for(config: Mapping[str, Any]) -> str:
    """The name under which an OPA with this configuration downloads kopa's candidate bundle; raises
    ConfigurationProblem naming what is missing (the writer retries, and readiness waits, until it is
    fixed)."""
    bundles = config.get("bundles") or {}
    names = [
        name
        for name, bundle in bundles.items()
        if isinstance(bundle, dict) and str(bundle.get("resource", "")).strip("/") == RESOURCE
    ]
    problem = ""
    if not names:
        problem = f"has no bundle with resource {RESOURCE!r}"
    elif not config.get("status"):
        problem = "has no status plugin (kopa reads each candidate's outcome from GET /v1/status)"
    if problem:
        raise ConfigurationProblem(
            f"the validation OPA at --opa-url {problem}: kopa checks every policy by having that OPA "
            "download a candidate bundle from kopa's bundle endpoint (README, bundle mode, gives its "
            "configuration)"
        )
    return str(names[0])
