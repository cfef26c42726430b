"""Which replicated resources the policies read: a walk of the rule graph in OPA's module ASTs.

There is no Rego compiler in Python. OPA's `GET /v1/policies` gives every module it holds (bundles' and
ConfigMaps' alike) with its AST; in OPA 1.x that AST is the compiled module, so references are already
absolute (`data.main.helper`, imports expanded, locals renamed). Its JSON shape is not a documented
contract, so this walk relies on little: a term is `{"type", "value"}`, a ref's value is a list of terms,
a rule has a `head` (with `ref`, or `name`) and everything else is walked generically. Imports and bare
rule names are resolved too, for an AST that comes unresolved. The tests pin the shape to the OPA version
kopa is tested with.

The walk starts from the rules at the entrypoint (kube-mgmt's `--analysis-entrypoint`) and from every rule
of the extra roots (ConfigMap policies, whose query kopa cannot know), follows every reference to another
rule, and collects each reference into `data.<replicate-path>.<plural>`. A reference whose plural is not
a constant (`data.kubernetes[kind]`, or `data.kubernetes` itself) cannot be resolved to one resource:
it is reported, never answered by replicating everything.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

# A reference as a path below `data`: a constant segment, or None for anything computed (a variable,
# a call, a number used as a key).
Path = tuple[str | None, ...]


@dataclass(frozen=True)
class Rule:
    path: Path  # where the rule's document is, below data (its package, then its head's ref)
    module: str  # the policy id it comes from
    node: dict[str, Any]  # the rule's AST, walked for references


@dataclass
class Analysis:
    """What the policies read below the replicate path."""

    entrypoint_found: bool
    plurals: set[str] = field(default_factory=set)
    # References that read the replicate path without a constant plural: "<policy id>: data.kubernetes[_]"
    unbounded: list[str] = field(default_factory=list)
    rules_visited: int = 0


def analyse(
    policies: Sequence[dict[str, Any]],
    *,
    entrypoint: Sequence[str],
    prefix: Sequence[str],
    roots: Iterable[str] = (),
) -> Analysis:
    """Walks from the entrypoint's rules and every rule of the policies named in `roots`.

    `policies` is OPA's listing (each with "id" and "ast"); `entrypoint` and `prefix` are paths below data
    (["main", "main"], ["kubernetes"]).
    """
    rules, modules = _rules(policies)
    index = _RuleIndex(rules)
    start = index.overlapping(tuple(entrypoint))
    result = Analysis(entrypoint_found=bool(start))
    root_ids = set(roots)
    start += [rule for rule in rules if rule.module in root_ids]
    want: Path = tuple(prefix)
    rule_plurals = {rule.path[len(want)] for rule in rules if _under(rule.path, want)}
    seen: set[int] = set()
    queue = list(start)
    while queue:
        rule = queue.pop()
        if id(rule) in seen:
            continue
        seen.add(id(rule))
        for ref in _references(rule, modules[rule.module]):
            if _overlaps(ref, want):
                plural = ref[len(want)] if len(ref) > len(want) else None
                if plural is None:
                    where = f"{rule.module}: {_show(ref)}"
                    if where not in result.unbounded:
                        result.unbounded.append(where)
                elif plural not in rule_plurals:  # a package below the replicate path is not a resource
                    result.plurals.add(plural)
            queue += [other for other in index.overlapping(ref) if id(other) not in seen]
    result.rules_visited = len(seen)
    return result


def rule_paths(policies: Sequence[dict[str, Any]]) -> dict[str, list[tuple[str, ...]]]:
    """Each module's rule paths below data, each down to its first segment that is not a constant: where
    OPA's rule tree holds the rule, which is what it checks against data for conflicts."""
    found: dict[str, list[tuple[str, ...]]] = {}
    for rule in _rules(policies)[0]:
        ground = []
        for segment in rule.path:
            if segment is None:
                break
            ground.append(str(segment))
        found.setdefault(rule.module, []).append(tuple(ground))
    return found


class _RuleIndex:
    """The rules in a tree of their path segments, so that finding the rules a reference reaches costs
    the reference's length, not the number of rules (a bundle of 300 modules has thousands)."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self._root = _Node()
        for rule in rules:
            node = self._root
            for segment in rule.path:
                node = node.children.setdefault(segment, _Node())
            node.rules.append(rule)
        self._cache: dict[Path, list[Rule]] = {}

    def overlapping(self, ref: Path) -> list[Rule]:
        """The rules whose document contains, or lies inside, what `ref` names."""
        found = self._cache.get(ref)
        if found is None:
            found = []
            self._collect(self._root, ref, 0, found)
            self._cache[ref] = found
        return found

    def _collect(self, node: _Node, ref: Path, depth: int, found: list[Rule]) -> None:
        found += node.rules  # a rule at a shorter path holds the referenced document inside its own
        if depth == len(ref):
            stack = list(node.children.values())
            while stack:
                below = stack.pop()
                found += below.rules
                stack += below.children.values()
            return
        segment = ref[depth]
        if segment is None:
            children = list(node.children.values())
        else:  # the same constant, or a rule whose head is computed at this depth
            children = [c for c in (node.children.get(segment), node.children.get(None)) if c is not None]
        for child in children:
            self._collect(child, ref, depth + 1, found)


@dataclass
class _Node:
    children: dict[str | None, _Node] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)


@dataclass(frozen=True)
class _Module:
    package: Path
    imports: dict[str, Path]  # the name a module-level import binds -> what it stands for
    rule_names: frozenset[str]  # first segment of each rule's head in this package


def _rules(policies: Sequence[dict[str, Any]]) -> tuple[list[Rule], dict[str, _Module]]:
    rules: list[Rule] = []
    modules: dict[str, _Module] = {}
    for policy in policies:
        ast = policy.get("ast") or {}
        module_id = str(policy.get("id", ""))
        package = _data_path(_terms((ast.get("package") or {}).get("path")))
        if package is None:
            continue
        imports: dict[str, Path] = {}
        for imp in ast.get("imports") or []:
            path = _term_path(imp.get("path"))
            if path is None or not path or path[0] != "data":
                continue  # input, future.keywords, rego.v1
            alias = imp.get("alias") or path[-1]
            if isinstance(alias, str):
                imports[alias] = tuple(path[1:])
        heads = []
        for node in ast.get("rules") or []:
            head = node.get("head") or {}
            ref = _terms(head.get("ref")) or [{"type": "var", "value": head.get("name")}]
            segments = (str(ref[0].get("value")), *_segments(ref[1:]))  # the head starts with its name
            heads.append(segments)
            rules.append(Rule(package + segments, module_id, node))
        names = frozenset(s[0] for s in heads if s and s[0] is not None)
        modules[module_id] = _Module(package, imports, names)
    return rules, modules


def _references(rule: Rule, module: _Module) -> Iterator[Path]:
    """Every document the rule reads, as a path below data. A bare variable naming an import or a rule of
    the same package counts too (an AST that was not compiled refers to them that way)."""
    for term in _walk(rule.node):
        kind = term.get("type")
        if kind == "ref":
            terms = _terms(term.get("value"))
        elif kind == "var":
            terms = [term]
        else:
            continue
        if not terms or terms[0].get("type") != "var":
            continue
        head = terms[0].get("value")
        rest = _segments(terms[1:])
        if head == "data":
            yield rest
        elif head in module.imports:
            yield module.imports[head] + rest
        elif head in module.rule_names:
            yield (*module.package, head, *rest)


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every term in the AST, depth first; `with` targets are skipped (they replace, never read)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if "type" in item and "value" in item:
                yield item
                if item["type"] == "ref" and isinstance(item["value"], list):
                    stack.extend(item["value"][1:])  # its head is part of it, not a term of its own
                    continue
            for key, value in item.items():
                if key == "with":
                    stack.extend(w.get("value") for w in value or [] if isinstance(w, dict))
                elif isinstance(value, list | dict):
                    stack.append(value)


def _terms(value: Any) -> list[dict[str, Any]]:
    return [t for t in value if isinstance(t, dict)] if isinstance(value, list) else []


def _segments(terms: Sequence[dict[str, Any]]) -> Path:
    return tuple(t["value"] if t.get("type") == "string" else None for t in terms)


def _term_path(term: Any) -> Path | None:
    """An import's path term (a ref) as segments with its head: ("data", "kubernetes", "services")."""
    if not isinstance(term, dict) or term.get("type") != "ref":
        return None
    terms = _terms(term.get("value"))
    if not terms or terms[0].get("type") != "var":
        return None
    return (str(terms[0].get("value")), *_segments(terms[1:]))


def _data_path(terms: list[dict[str, Any]]) -> Path | None:
    """A package path (data.a.b) as the segments below data."""
    if not terms or terms[0].get("value") != "data":
        return None
    return _segments(terms[1:])


def _overlaps(a: Path, b: Path) -> bool:
    """Whether two paths can name the same document or one contains the other."""
    return all(x is None or y is None or x == y for x, y in zip(a, b, strict=False))


def _under(path: Path, prefix: Path) -> bool:
    return len(path) > len(prefix) and path[: len(prefix)] == prefix and path[len(prefix)] is not None


def _show(ref: Path) -> str:
    return "data" + "".join(f".{s}" if s is not None else "[_]" for s in ref)
