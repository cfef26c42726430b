"""Kinds of value: how one type of setting is written on the command line, in the environment and in YAML.

A new type (a duration, say) is one `Kind` subclass; neither the flag parser nor the config file reader
changes. The instances (STRING, BOOL, ...) are what the options table names.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from typing import ClassVar, Generic, TypeVar

from app.settings.errors import BadItem, describe

T = TypeVar("T")


class Kind(ABC, Generic[T]):
    """One type of setting. A new type (a duration, say) is one subclass; no parser changes."""

    #: False only for booleans: `--x` alone means true and `--x v` leaves `v` alone, as in pflag.
    takes_argument: ClassVar[bool] = True
    #: How the type is named in "must be ..." messages about a config file value of the wrong shape.
    noun: ClassVar[str]
    #: Said after the option's help text, for syntax the type adds (lists: repeatable).
    help_note: ClassVar[str] = ""

    @abstractmethod
    def parse(self, text: str) -> T:
        """Reads a flag's or environment variable's text; ValueError says what is wrong."""

    @abstractmethod
    def to_text(self, value: T) -> str:
        """Writes a value as a flag would take it, for help text and error messages."""

    def from_yaml(self, node: object) -> T:
        """The config file's scalars arrive as text (see sources._TextLoader), so they parse like flags."""
        if isinstance(node, str):
            return self.parse(node)
        raise TypeError(f"must be {self.noun}, not {describe(node)}")

    def to_yaml(self, value: T) -> str:
        return json.dumps(self.to_text(value))  # a JSON string is a YAML double-quoted scalar

    def combine(self, earlier: T, later: T) -> T:
        """A repeated flag: the last one wins, as in pflag."""
        return later

    def flag_syntax(self, metavar: str) -> str:
        return f"={metavar}"


class _String(Kind[str]):
    noun = "a string"

    def parse(self, text: str) -> str:
        return text

    def to_text(self, value: str) -> str:
        return value


class _Bool(Kind[bool]):
    takes_argument = False
    noun = "a boolean"
    # Go's strconv.ParseBool, which pflag uses: kube-mgmt users may have written any of these.
    TRUE: ClassVar[frozenset[str]] = frozenset({"1", "t", "T", "TRUE", "true", "True"})
    FALSE: ClassVar[frozenset[str]] = frozenset({"0", "f", "F", "FALSE", "false", "False"})

    def parse(self, text: str) -> bool:
        if text in self.TRUE:
            return True
        if text in self.FALSE:
            return False
        raise ValueError("must be true or false")

    def to_text(self, value: bool) -> str:
        return "true" if value else "false"

    def from_yaml(self, node: object) -> bool:
        if isinstance(node, bool):  # an explicit `!!bool` tag
            return node
        return super().from_yaml(node)

    def to_yaml(self, value: bool) -> str:
        return self.to_text(value)

    def flag_syntax(self, metavar: str) -> str:
        return f"[={metavar}]" if metavar else ""


class _StringList(Kind[tuple[str, ...]]):
    noun = "a list of strings"
    help_note = "Repeatable; items are comma-separated."

    def parse(self, text: str) -> tuple[str, ...]:
        # Empty items are dropped, so `--x=` is the empty list and a trailing comma is harmless.
        return tuple(item for item in (part.strip() for part in text.split(",")) if item)

    def to_text(self, value: tuple[str, ...]) -> str:
        return ",".join(value)

    def from_yaml(self, node: object) -> tuple[str, ...]:
        if isinstance(node, list):
            for item in node:
                if not isinstance(item, str):
                    raise TypeError(f"must be {self.noun}, but an item is {describe(item)}")
            return tuple(item for item in (part.strip() for part in node) if item)
        return super().from_yaml(node)

    def to_yaml(self, value: tuple[str, ...]) -> str:
        return json.dumps(list(value))  # a JSON array is a YAML flow sequence

    def combine(self, earlier: tuple[str, ...], later: tuple[str, ...]) -> tuple[str, ...]:
        return earlier + later

    def flag_syntax(self, metavar: str) -> str:
        return f"={metavar}[,{metavar}...]"


class _Duration(Kind[float]):
    """Go's duration syntax, as kube-mgmt's flags take it (`10s`, `1m30s`, `500ms`), or plain seconds."""

    noun = "a duration"
    UNITS: ClassVar[dict[str, float]] = {
        "ns": 1e-9,
        "us": 1e-6,
        "µs": 1e-6,
        "ms": 1e-3,
        "s": 1.0,
        "m": 60.0,
        "h": 3600.0,
    }
    PART: ClassVar[re.Pattern[str]] = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
    # Longer than any interval or timeout means anything, and short of what timers and the Lease's int32
    # seconds overflow on.
    LONGEST: ClassVar[float] = 365 * 24 * 3600.0

    def parse(self, text: str) -> float:
        value = text.strip()
        try:
            seconds = float(value)
        except ValueError:
            pos, seconds = 0, 0.0
            for match in self.PART.finditer(value):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * self.UNITS[match.group(2)]
                pos = match.end()
            if pos != len(value) or not value:
                raise ValueError("must be a duration such as 10s, 1m30s or 500ms") from None
        if not math.isfinite(seconds):
            raise ValueError("must be a duration such as 10s, 1m30s or 500ms")
        if seconds < 0:
            raise ValueError("must not be negative")
        if seconds > self.LONGEST:
            raise ValueError("must be at most 8760h (a year)")
        return seconds

    def to_text(self, value: float) -> str:
        return f"{value:g}s"


class _Assignments(Kind[tuple[tuple[str, str], ...]]):
    """Repeatable `NAME=VALUE` items whose values may hold commas (label selectors, field lists).

    A flag or a config file list item is one assignment; in the environment, assignments are separated by
    semicolons, since commas belong to the values.
    """

    noun = "a list of NAME=VALUE strings"
    help_note = "Repeatable; in the environment, separate items with ';'."

    def parse(self, text: str) -> tuple[tuple[str, str], ...]:
        items = []
        for part in (p.strip() for p in text.split(";")):
            if not part:
                continue
            name, sep, value = part.partition("=")
            if not sep or not name.strip():
                raise BadItem(part, "must be RESOURCE=VALUE, e.g. v1/services=app=web")
            items.append((name.strip(), value.strip()))
        return tuple(items)

    def to_text(self, value: tuple[tuple[str, str], ...]) -> str:
        return ";".join(f"{name}={val}" for name, val in value)

    def from_yaml(self, node: object) -> tuple[tuple[str, str], ...]:
        if isinstance(node, list):
            items: tuple[tuple[str, str], ...] = ()
            for item in node:
                if not isinstance(item, str):
                    raise TypeError(f"must be {self.noun}, but an item is {describe(item)}")
                items += self.parse(item)
            return items
        return super().from_yaml(node)

    def to_yaml(self, value: tuple[tuple[str, str], ...]) -> str:
        return json.dumps([f"{name}={val}" for name, val in value])

    def combine(
        self, earlier: tuple[tuple[str, str], ...], later: tuple[tuple[str, str], ...]
    ) -> tuple[tuple[str, str], ...]:
        return earlier + later

    def flag_syntax(self, metavar: str) -> str:
        return f"={metavar}"


STRING: Kind[str] = _String()
BOOL: Kind[bool] = _Bool()
STRING_LIST: Kind[tuple[str, ...]] = _StringList()
ASSIGNMENTS: Kind[tuple[tuple[str, str], ...]] = _Assignments()
DURATION: Kind[float] = _Duration()

#: Every way to write a boolean, for the hint about `--x false` on the command line.
BOOL_SPELLINGS: frozenset[str] = _Bool.TRUE | _Bool.FALSE
