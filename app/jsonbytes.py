"""JSON out of kopa, however deeply nested, equality of what came in, and JSON text read as Go reads it.

orjson reads up to 1,024 levels of nesting but writes at most 254, so a data ConfigMap or a replicated
object nested deeper (the API server and OPA accept it, kube-mgmt loads it) failed at every attempt. Past
orjson's depth the standard library writes it, and values that deep are compared, with room in the
recursion limit for that one call.

orjson refuses a lone UTF-16 surrogate escape (`"\\ud800"`), which Go's decoder (kube-mgmt's, OPA's) reads as
U+FFFD; `loads` does the same, so such a data ConfigMap loads as it does with kube-mgmt.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

# What orjson reads: anything kopa holds as Python values came through it.
DEEPEST_READ = 1024
# The standard library's encoder and a comparison of nested values take a frame or two per level.
_FRAMES = 4 * DEEPEST_READ


@contextmanager
def _room() -> Iterator[None]:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + _FRAMES)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def dumps(value: Any, *, sort_keys: bool = False) -> bytes:
    """Compact JSON, keys in order when asked (for digests)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except orjson.JSONEncodeError as exc:
        if "Recursion limit" not in str(exc):
            raise
    with _room():
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys)
    return text.encode()


_SURROGATE = re.compile("[\ud800-\udfff]")


def loads(text: str | bytes) -> Any:
    """orjson.loads, except that lone surrogate escapes read as U+FFFD (Go's reading) instead of failing."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if "surrogate" not in str(exc):
            raise
        first = exc
    with _room():
        try:
            value = json.loads(text, parse_constant=_not_json)
        except ValueError:
            raise first from None  # not JSON for another reason too: orjson's message
        return _replace_surrogates(value)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _replace_surrogates(value: Any) -> Any:
    """Each lone surrogate in keys and strings as U+FFFD (the decoder joined the paired ones)."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_replace_surrogates(key): _replace_surrogates(item) for key, item in value.items()}
    return value


def equal(a: Any, b: Any) -> bool:
    """a == b for values read from JSON, at any depth orjson reads."""
    with _room():
        return bool(a == b)
