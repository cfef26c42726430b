"""JSON data from ConfigMaps, kept at data.<namespace>.<configmap>.<key> in OPA.

Each key must hold a JSON object. A key that stops parsing keeps its last good value in OPA (bad input loses
nothing) and reports the error; a key removed from the ConfigMap is removed from OPA; a ConfigMap that is
deleted or unlabelled has exactly its own subtree removed, never anything beside it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from app.jsonbytes import dumps, equal, loads
from app.model import ObjectKey
from app.opa.client import Chunks, OpaError

log = logging.getLogger(__name__)


def kopa_error(code: str, message: str) -> dict[str, Any]:
    """kopa's own errors take the shape of OPA's, so users read one format on their ConfigMaps."""
    return {"code": code, "message": message}


def parse_document(key: str, text: str) -> tuple[bytes | None, dict[str, Any] | None]:
    """(serialized JSON object, None) or (None, error). Only objects are valid, as in kube-mgmt, which also
    takes `null` (Go decodes it into an object as nothing) and writes it as null."""
    try:
        value = loads(text)
    except orjson.JSONDecodeError as exc:
        return None, kopa_error("invalid_data", f"key {key}: not valid JSON: {exc}")
    if value is not None and not isinstance(value, dict):
        # JSON's names for JSON's types.
        names = {list: "an array", bool: "a boolean", str: "a string"}
        kind = names.get(type(value), "a number")
        return None, kopa_error("invalid_data", f"key {key}: must be a JSON object, got {kind}")
    return dumps(value), None


class DataApi(Protocol):
    """What the book needs of OPA."""

    async def put_data(self, path: Sequence[str], document: bytes | Chunks) -> None: ...

    async def delete_data(self, path: Sequence[str]) -> bool: ...

    async def get_data(self, path: Sequence[str]) -> Any: ...


def _digest(doc: bytes) -> bytes:
    return hashlib.blake2b(doc, digest_size=16).digest()


@dataclass
class DataBook:
    opa: DataApi
    # What OPA holds per ConfigMap: key -> digest of the document written.
    loaded: dict[ObjectKey, dict[str, bytes]] = field(default_factory=dict)
    errors: dict[ObjectKey, dict[str, dict[str, Any]]] = field(default_factory=dict)
    refused: set[ObjectKey] = field(default_factory=set)  # with a key OPA refused (a policy's path)
    writes: int = 0  # documents written or removed: what a policy refused for a data path may wait on
    repairs: int = 0
    # ConfigMaps a previous kopa wrote documents for (its ledger), with their keys, that this one has not
    # synced yet: their keys that no longer exist are removed at the first sync.
    inherited: dict[ObjectKey, frozenset[str]] = field(default_factory=dict)

    def reset(self) -> None:
        """OPA restarted and holds nothing: every document is written again on its next sync."""
        # keep the keys (kopa may have written them into the new OPA before it noticed the
        # restart), with a digest that matches nothing, so they are written again, or deleted when removed.
        for docs in self.loaded.values():
            for key in docs:
                docs[key] = b""

    async def set_configmap(self, configmap: ObjectKey, texts: dict[str, str]) -> None:
        """Makes OPA hold these documents for one ConfigMap; an empty dict removes its subtree. Each key
        is written on its own: the subtree may hold more than this ConfigMap (a replicated collection on
        the same path), which a PUT of it whole would wipe."""
        ns, name = configmap
        errors: dict[str, dict[str, Any]] = {}
        documents: dict[str, bytes] = {}
        for key, text in texts.items():
            doc, error = parse_document(key, text)
            if error is not None:
                errors[key] = error
            elif doc is not None:
                documents[key] = doc
        inherited = self.inherited.get(configmap)
        self.refused.discard(configmap)
        if not texts:
            if self.loaded.get(configmap) or inherited:
                await self.opa.delete_data([ns, name])
                self.writes += 1
            self.loaded.pop(configmap, None)
            self.errors.pop(configmap, None)
            self.inherited.pop(configmap, None)
            return
        loaded = self.loaded.setdefault(configmap, {})
        for key in sorted((set(loaded) | (inherited or frozenset())) - set(texts)):
            await self.opa.delete_data([ns, name, key])
            self.writes += 1
            loaded.pop(key, None)
        for key, doc in sorted(documents.items()):
            digest = _digest(doc)
            if loaded.get(key) == digest:
                continue
            try:
                await self.opa.put_data([ns, name, key], doc)
            except OpaError as exc:
                errors[key] = exc.body or kopa_error(exc.code, exc.message)
                self.refused.add(configmap)
                continue
            self.writes += 1
            loaded[key] = digest
        self.errors[configmap] = errors
        self.inherited.pop(configmap, None)

    def documented(self) -> dict[ObjectKey, frozenset[str]]:
        """Each ConfigMap's keys that may have a document in OPA (a key that stopped parsing keeps its
        last good one there): what the ledger names, with what is inherited and not synced yet."""
        found = dict(self.inherited)
        for configmap, docs in self.loaded.items():
            found[configmap] = frozenset(docs) | frozenset(self.errors.get(configmap, ()))
        return found

    async def check(self, texts_of: Callable[[ObjectKey], dict[str, str]]) -> int:
        """Compares each document kopa wrote with OPA's (anti-entropy) and writes again what differs.

        Each document is read at its own path: a GET of a prefix would evaluate any rules under it. A
        document whose ConfigMap changed since it was written is left to the sync already queued for it.
        Returns the number of repairs.
        """
        repairs = 0
        for configmap, docs in sorted(self.loaded.items()):
            texts = texts_of(configmap)
            for key, digest in sorted(docs.items()):
                doc, _ = parse_document(key, texts.get(key, ""))
                if doc is None or _digest(doc) != digest:
                    continue
                held = await self.opa.get_data([*configmap, key])
                if equal(held, orjson.loads(doc)):
                    continue
                repairs += 1
                where = "/".join([*configmap, key])
                state = "is missing" if held is None else "differs"
                log.warning("drift: data %s in OPA %s; writing it again", where, state)
                try:
                    await self.opa.put_data([*configmap, key], doc)
                except OpaError as exc:
                    log.warning("drift: could not write data %s again: %s", where, exc)
        self.repairs += repairs
        return repairs

    def document_count(self) -> int:
        return sum(len(keys) for keys in self.loaded.values())

    def errors_of(self, configmap: ObjectKey) -> dict[str, dict[str, Any]]:
        return self.errors.get(configmap, {})
