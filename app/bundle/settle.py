"""Which of a batch of module changes enter the bundle: one compile of the whole candidate when it is clean,
and as few more as it takes to find the culprits when it is not.

In push mode OPA compiles every module it holds on every `PUT /v1/policies`, so loading N modules costs N
compiles of a growing set: quadratic. A bundle is compiled once on activation, so kopa checks a batch the
same way: the candidate (what the bundle holds, with the batch's changes) is compiled once, and only when
that fails does it take more compiles to decide, with push mode's outcomes:

- **Errors that name only changed modules** (an undefined reference, a type error, a parse error in the
  module itself) refuse those modules, which keep what the bundle held before (or nothing); the rest is
  compiled again, since a refused module may be one that others in the batch needed. Each round refuses at
  least one module, so this ends; usually after one or two rounds.
- **Anything else** (an error in a module the batch did not change, a conflict between two modules, an
  error without a file): the changes are applied in order, as push mode's PUTs and DELETEs are, finding by
  bisection the first change after which the candidate no longer compiles. A module that fails is refused
  (and keeps its previous text); removing a module that others need first unloads those others, as OPA's
  DELETE demands in push mode. Refused modules are tried once more at the end, as push mode tries a failed
  module again when one it may need is loaded. This costs about log2(N) compiles per culprit.

Nothing here does I/O: `Compile` is given (the validation OPA, or an in-memory model in unit tests).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# A compile of a whole set of modules (id -> text): the errors, each with the module id it names (None when
# the error names no module kopa knows). An empty list: it compiles.
Failure = tuple[str | None, dict[str, Any]]
Compile = Callable[[Mapping[str, str]], Awaitable[list[Failure]]]

COMPILE_MESSAGE = "error(s) occurred while compiling module(s)"


@dataclass(frozen=True)
class Outcome:
    """What became of one module: the text the bundle now holds under its id (None: nothing), and OPA's
    error when the wanted text was refused or the module was unloaded."""

    id: str
    held: str | None
    error: dict[str, Any] | None = None


def error_body(failures: Sequence[Failure], module_id: str) -> dict[str, Any]:
    """The failures as OPA's answer to a PUT of that module (the shape push mode reports on ConfigMaps)."""
    errors = [error for named, error in failures if named == module_id] or [e for _, e in failures]
    return {"code": "invalid_parameter", "message": COMPILE_MESSAGE, "errors": errors}


def _pairwise(failures: Sequence[Failure]) -> bool:
    """Errors between modules (which one is named is OPA's choice, not push mode's order)."""
    return any(
        "conflict" in str(error.get("message", "")) or error.get("code") == "rego_recursion_error"
        for _, error in failures
    )


def _applied(base: Mapping[str, str], changes: Sequence[tuple[str, str | None]]) -> dict[str, str]:
    out = dict(base)
    for module_id, text in changes:
        if text is None:
            out.pop(module_id, None)
        else:
            out[module_id] = text
    return out


async def settle(
    accepted: Mapping[str, str], changes: Sequence[tuple[str, str | None]], compile_: Compile
) -> tuple[dict[str, str], list[Outcome]]:
    """The modules the bundle holds after `changes` (id -> new text, or None to remove, in the order kopa
    made them) were checked against `accepted` (a set that compiles), and the outcome of each module that
    changed or was unloaded."""
    if not changes:
        return dict(accepted), []
    quick = await _by_rounds(accepted, changes, compile_)
    if quick is not None:
        return quick
    return await _in_order(accepted, changes, compile_)


async def _by_rounds(
    accepted: Mapping[str, str], changes: Sequence[tuple[str, str | None]], compile_: Compile
) -> tuple[dict[str, str], list[Outcome]] | None:
    """Refuses the changed modules the errors name, round after round; None when the errors cannot be
    pinned on changed modules this way."""
    puts = {module_id for module_id, text in changes if text is not None}
    candidate = _applied(accepted, changes)
    refused: dict[str, dict[str, Any]] = {}
    while True:
        failures = await compile_(candidate)
        if not failures:
            break
        named = {module_id for module_id, _ in failures if module_id is not None}
        if not named or not named <= puts - set(refused) or _pairwise(failures):
            return None
        for module_id in sorted(named):
            refused[module_id] = error_body(failures, module_id)
            previous = accepted.get(module_id)
            if previous is None:
                candidate.pop(module_id, None)
            else:
                candidate[module_id] = previous
    outcomes = [
        Outcome(module_id, candidate.get(module_id), refused.get(module_id))
        for module_id in dict.fromkeys(module_id for module_id, _ in changes)
    ]
    return candidate, outcomes


async def _in_order(
    accepted: Mapping[str, str], changes: Sequence[tuple[str, str | None]], compile_: Compile
) -> tuple[dict[str, str], list[Outcome]]:
    """Push mode's outcome: each change applied in order if the set still compiles, found by bisection."""
    candidate = dict(accepted)
    outcomes: dict[str, Outcome] = {}
    refused: list[tuple[str, str]] = []
    remaining = list(changes)
    while remaining:
        failures = await compile_(_applied(candidate, remaining))
        if not failures:
            candidate = _applied(candidate, remaining)
            outcomes.update((i, Outcome(i, t)) for i, t in remaining)
            break
        good, failures = await _longest_clean_prefix(candidate, remaining, failures, compile_)
        candidate = _applied(candidate, remaining[:good])
        outcomes.update((i, Outcome(i, t)) for i, t in remaining[:good])
        module_id, text = remaining[good]
        remaining = remaining[good + 1 :]
        if text is not None:
            refused.append((module_id, text))
            outcomes[module_id] = Outcome(
                module_id, candidate.get(module_id), error_body(failures, module_id)
            )
            continue
        candidate, unloaded = await _remove(candidate, module_id, compile_)
        outcomes[module_id] = Outcome(module_id, None)
        outcomes.update((o.id, o) for o in unloaded)  # or the module itself, kept
    for module_id, text in refused:  # a module it needed may have come later in the batch
        trial = {**candidate, module_id: text}
        if outcomes[module_id].error is not None and not await compile_(trial):
            candidate = trial
            outcomes[module_id] = Outcome(module_id, text)
    return candidate, list(outcomes.values())


async def _longest_clean_prefix(
    candidate: Mapping[str, str],
    changes: Sequence[tuple[str, str | None]],
    failures: list[Failure],
    compile_: Compile,
) -> tuple[int, list[Failure]]:
    """The number of changes that still compile applied to `candidate` (which compiles), all of them known
    not to; and the failures of one more."""
    low, high = 0, len(changes)
    while high - low > 1:
        middle = (low + high) // 2
        found = await compile_(_applied(candidate, changes[:middle]))
        if found:
            high, failures = middle, found
        else:
            low = middle
    return low, failures


async def _remove(
    candidate: Mapping[str, str], module_id: str, compile_: Compile
) -> tuple[dict[str, str], list[Outcome]]:
    """Removes a module; the modules that no longer compile without it are unloaded first, as push mode
    does when OPA refuses to delete a module others depend on."""
    if module_id not in candidate:
        return dict(candidate), []
    rest = {i: t for i, t in candidate.items() if i != module_id}
    unloaded: list[Outcome] = []
    reason = {
        "code": "invalid_operation",
        "message": f"unloaded because it depends on {module_id}, which was removed",
    }
    while failures := await compile_(rest):
        named = sorted({i for i, _ in failures if i is not None and i in rest})
        if not named:  # nothing to pin it on: keep the module rather than serve a set that does not compile
            return dict(candidate), [
                Outcome(module_id, candidate[module_id], error_body(failures, module_id))
            ]
        for dependent in named:
            del rest[dependent]
            unloaded.append(Outcome(dependent, None, reason))
    return rest, unloaded
