"""Which data ConfigMaps, and which of their keys, have documents in OPA: kept in OPA at
data.system.kopa_ledger.

OPA's data API cannot tell a document kopa wrote from one that came another way (a file given to `opa
run`, another client, a replicated collection that shares the path), and a policy's rules show up beside
documents when read. So a kopa restarted beside a running OPA could not know that a data ConfigMap deleted,
or a key removed, while no kopa ran had left documents behind, and OPA kept them for good. The ledger names
each data ConfigMap kopa has written and its keys; the next kopa reads it and removes exactly those that no
ConfigMap holds any more. It is widened before documents are written and trimmed after they are removed,
so a kopa killed in the middle of a batch leaves an entry too many (whose removal finds nothing), never one
too few.

Push mode only: a bundle is built from scratch, so nothing outlives the kopa that served it. Where OPA
refuses the write (a bundle owns `system`), kopa says so once and goes on without it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from app.configmaps.data import DataApi
from app.jsonbytes import dumps
from app.model import ObjectKey
from app.opa.client import OpaError

log = logging.getLogger(__name__)

LEDGER_PATH = ("system", "kopa_ledger")
FIELD = "dataConfigMaps"

Entries = Mapping[ObjectKey, frozenset[str]]  # a data ConfigMap -> the keys it may have in OPA


@dataclass
class Ledger:
    opa: DataApi
    # What OPA's copy names, as far as this kopa knows (nothing in a new OPA process: none is there).
    written: Entries = field(default_factory=dict)
    read_done: bool = False  # whether this kopa has read what its predecessor left (once, at its start)
    refused: bool = False  # OPA refused a write (a bundle owns the path): the ledger is off from then on

    async def read(self) -> dict[ObjectKey, frozenset[str]]:
        """The entries in OPA's copy; those that are not `<namespace>/<name>: [keys]` are skipped."""
        held = await self.opa.get_data(LEDGER_PATH)
        entries = held.get(FIELD) if isinstance(held, dict) else None
        found: dict[ObjectKey, frozenset[str]] = {}
        for name, keys in (entries if isinstance(entries, dict) else {}).items():
            parts = name.split("/")
            if len(parts) == 2 and all(parts) and isinstance(keys, list):
                found[ObjectKey(parts[0], parts[1])] = frozenset(k for k in keys if isinstance(k, str) and k)
        self.written, self.read_done = found, True
        if found:
            log.debug("the ledger in OPA names %d data ConfigMaps", len(found))
        return found

    def forget(self) -> None:
        """OPA restarted: the new process holds no ledger until it is written there."""
        self.written = {}

    async def include(self, entries: Entries) -> None:
        """Before writing documents: the ledger names at least these (and what it named)."""
        wanted = dict(self.written)
        for configmap, keys in entries.items():
            wanted[configmap] = wanted.get(configmap, frozenset()) | keys
        await self.record(wanted)

    async def record(self, entries: Entries) -> None:
        """After a batch: the ledger names exactly these."""
        wanted = {configmap: frozenset(keys) for configmap, keys in entries.items()}
        if wanted == self.written or self.refused:
            return
        names = {f"{cm.namespace}/{cm.name}": sorted(keys) for cm, keys in sorted(wanted.items())}
        try:
            await self.opa.put_data(LEDGER_PATH, dumps({FIELD: names}))
        except OpaError as exc:
            self.refused = True
            log.warning(
                "OPA refused kopa's ledger at data.%s (%s); data ConfigMaps deleted while kopa is not "
                "running will not be cleaned up from OPA",
                ".".join(LEDGER_PATH),
                exc,
            )
            return
        self.written = wanted
