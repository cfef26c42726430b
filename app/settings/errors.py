"""How a mistake in the settings is told: one line, naming the setting as the user wrote it.

Every source (flags, environment, config file) and every check words its errors with these helpers, so that
the messages read alike wherever the mistake was made; the unit tests pin them byte for byte.
"""

from __future__ import annotations

import difflib
import json


class SettingsError(Exception):
    """A setting is wrong; the message is one line naming it as the user wrote it, so the CLI can exit 2."""

    def __init__(self, message: str) -> None:
        # The CLI prints this as one log line: a stray newline from user input must not break that.
        super().__init__(" ".join(message.splitlines()))


class HelpRequested(Exception):
    """`--help` was given: the CLI prints `.text` and exits 0, without starting anything."""

    def __init__(self, text: str) -> None:
        super().__init__("help requested")
        self.text = text


class BadItem(ValueError):
    """A list item is invalid: the message then quotes that item rather than the whole list."""

    def __init__(self, item: str, reason: str) -> None:
        super().__init__(reason)
        self.item = item


def describe(node: object) -> str:
    if node is None:
        return "null"
    if isinstance(node, dict):
        return "a mapping"
    if isinstance(node, list):
        return "a list"
    if isinstance(node, bool):
        return "a boolean"
    if isinstance(node, str):
        return "text"
    return f"a value of type {type(node).__name__}"


def shown(text: str) -> str:
    """User text inside a message: quoted (Go %q style) so that the message stays one readable line."""
    return json.dumps(text, ensure_ascii=False)


def bare(text: str) -> str:
    """A name or path the user typed: as is when plain, quoted when it has spaces or control characters."""
    if text and all(c.isprintable() and not c.isspace() for c in text):
        return text
    return shown(text)


def suggestion(name: str, candidates: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.75)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""
