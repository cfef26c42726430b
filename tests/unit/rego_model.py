"""A small model of OPA's compiler for unit tests of what enters the bundle: enough Rego to make the errors
that decide outcomes (the real OPA's view is in tests/integration/test_bundle_mode.py).

- a module whose text contains `PARSE ERROR` fails to parse;
- `x := data.p.r` needs a rule `r` in some module of package `p` (else: undefined ref, naming the module);
- a rule and a function of the same name in one package conflict (OPA names the module whose id sorts
  first, whichever came first).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from app.bundle.settle import Failure
from app.configmaps.policies import package_of

_RULE = re.compile(r"^(\w+)(\(\w*\))?\s*:=", re.MULTILINE)
_REF = re.compile(r"data\.([\w.]+)")


def _error(code: str, message: str, module_id: str) -> dict[str, Any]:
    return {"code": code, "message": message, "location": {"file": module_id, "row": 1, "col": 1}}


class RegoModel:
    """Counts the distinct sets it compiles (`compiles`), as the real compiler keeps outcomes by revision."""

    def __init__(self) -> None:
        self.compiles: list[dict[str, str]] = []

    async def compile(self, modules: Mapping[str, str]) -> list[Failure]:
        if dict(modules) not in self.compiles:
            self.compiles.append(dict(modules))
        parse = [i for i in sorted(modules) if "PARSE ERROR" in modules[i]]
        if parse:  # OPA stops at the parse stage
            return [(i, _error("rego_parse_error", "unexpected eof token", i)) for i in parse]
        rules: dict[tuple[str, ...], dict[str, list[tuple[str, bool]]]] = {}
        for module_id in sorted(modules):
            package = package_of(modules[module_id])
            for name, args in _RULE.findall(modules[module_id]):
                rules.setdefault(package, {}).setdefault(name, []).append((module_id, bool(args)))
        conflicts = [
            (
                defs[0][0],
                _error("rego_type_error", f"conflicting rules data.{'.'.join(p)}.{n} found", defs[0][0]),
            )
            for p, names in rules.items()
            for n, defs in names.items()
            if len({function for _, function in defs}) > 1
        ]
        if conflicts:
            return list(conflicts)
        failures: list[Failure] = []
        for module_id in sorted(modules):
            for ref in _REF.findall(modules[module_id]):
                *package, name = ref.split(".")
                if name not in rules.get(tuple(package), {}):
                    failures.append(
                        (module_id, _error("rego_type_error", f"undefined ref: data.{ref}", module_id))
                    )
        return failures

    async def rule_paths(
        self, modules: Mapping[str, str], ids: Sequence[str]
    ) -> dict[str, list[tuple[str, ...]]]:
        return {i: [(*package_of(modules[i]), name) for name, _ in _RULE.findall(modules[i])] for i in ids}

    def rest(self, modules: Mapping[str, str]) -> None:
        """Nothing to offer in the model."""
