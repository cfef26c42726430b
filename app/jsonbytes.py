"""JSON out of kopa, however deeply nested, and equality of what came in.

orjson reads up to 1,024 levels of nesting but writes at most 254, so a data ConfigMap or a replicated
object nested deeper (the API server and OPA accept it, kube-mgmt loads it) failed at every attempt. Past
orjson's depth the standard library writes it, and values that deep are compared, with room in the
recursion limit for that one call.
"""

from __future__ import annotations

import json
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


def equal(a: Any, b: Any) -> bool:
    """a == b for values read from JSON, at any depth orjson reads."""
    with _room():
        return bool(a == b)
