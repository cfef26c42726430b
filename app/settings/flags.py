"""The command line, with Go's pflag syntax, because kube-mgmt users' manifests are written for it.

`--x=v` and `--x v`; booleans only as `--x` or `--x=false`; lists repeatable and comma-separated; no
abbreviations; `--` ends the flags. kube-mgmt's deprecated flags are accepted with a warning, and its
unsupported ones stop start-up with a message saying what they were for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.settings.docs import help_text
from app.settings.errors import HelpRequested, SettingsError, bare, shown, suggestion
from app.settings.given import Given, Where, checked, parse_value
from app.settings.kinds import BOOL_SPELLINGS, Kind
from app.settings.options import BY_NAME, BY_SHORT, LEGACY, LEGACY_BY_NAME, OPTIONS, Legacy, Option


@dataclass
class _FlagResult:
    given: dict[str, Given] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Flag:
    """What a flag on the command line stands for."""

    kind: Kind[Any]
    option: Option[Any] | None  # None: a kube-mgmt flag accepted without effect
    legacy: Legacy | None = None

    @property
    def long_name(self) -> str:
        return self.legacy.flag if self.legacy else self.option.flag if self.option else ""


def _all_flags() -> list[str]:
    return [option.flag for option in OPTIONS] + [legacy.flag for legacy in LEGACY]


def _resolve(dashes: str, name: str) -> _Flag:
    spelled = dashes + name
    if dashes == "-":
        option = BY_SHORT.get(name)
        if option is None:
            hint = " (long flags take two dashes)" if f"-{spelled}" in _all_flags() else ""
            raise SettingsError(f"unknown flag {bare(spelled)}{hint}")
        return _Flag(option.kind, option)
    option = BY_NAME.get(name)
    if option is not None:
        return _Flag(option.kind, option)
    legacy = LEGACY_BY_NAME.get(name)
    if legacy is None:
        raise SettingsError(f"unknown flag {bare(spelled)}{suggestion(spelled, _all_flags(), '')}")
    if legacy.unsupported:
        raise SettingsError(f"{legacy.flag} is not supported yet (kube-mgmt's {legacy.unsupported})")
    return _Flag(legacy.kind, BY_NAME[legacy.alias_of] if legacy.alias_of else None, legacy)


def _legacy_warning(legacy: Legacy) -> str:
    if legacy.alias_of:
        return f"{legacy.flag} is deprecated: use --{legacy.alias_of}"
    return f"{legacy.flag} has no effect: {legacy.no_effect}; remove it"


def read_flags(argv: Sequence[str]) -> _FlagResult:
    result = _FlagResult()
    raw: dict[str, Given] = {}  # before validation, so that a repeated list flag adds up first
    long_names: dict[str, str] = {}  # option name -> the long flag that set it (its own, or an alias)
    args = list(argv)
    previous_bool = ""
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":  # pflag: the end of flags; what follows is positional, and kopa takes none
            if i < len(args):
                raise SettingsError(
                    f"unexpected argument {shown(args[i])}: kopa takes no positional arguments"
                )
            break
        if not arg.startswith("-") or arg == "-":
            hint = ""
            if previous_bool and arg in BOOL_SPELLINGS:
                hint = f" (a boolean flag takes its value after '=': {previous_bool}={arg})"
            raise SettingsError(f"unexpected argument {shown(arg)}: kopa takes no positional arguments{hint}")

        dashes = "--" if arg.startswith("--") else "-"
        name, has_value, text = arg[len(dashes) :].partition("=")
        where = Where(dashes + name)
        flag = _resolve(dashes, name)
        previous_bool = ""
        if not flag.kind.takes_argument:
            previous_bool = where.name
            text = text if has_value else "true"
        elif not has_value:
            if i >= len(args):
                raise SettingsError(f"flag needs an argument: {bare(where.name)}")
            text = args[i]
            i += 1
        value = parse_value(flag.kind, text, where)

        if flag.legacy and _legacy_warning(flag.legacy) not in result.warnings:
            result.warnings.append(_legacy_warning(flag.legacy))
        option = flag.option
        if option is None:
            continue
        if option.name == "help" and value:
            raise HelpRequested(help_text())
        first = long_names.setdefault(option.name, flag.long_name)
        if first != flag.long_name:
            alias = first if first != option.flag else flag.long_name
            raise SettingsError(
                f"{first} and {flag.long_name} both given: {alias} is the deprecated name of "
                f"{option.flag}; keep only {option.flag}"
            )
        earlier = raw.get(option.name)
        if earlier is not None:
            value = option.kind.combine(earlier.value, value)
        raw[option.name] = Given(value, where)

    for name, given in raw.items():
        result.given[name] = Given(checked(BY_NAME[name], given), given.where)
    return result
