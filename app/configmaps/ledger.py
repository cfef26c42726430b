"""Which data ConfigMaps have documents in OPA, kept in OPA itself at data.system.kopa_ledger.

OPA's data API cannot tell a document kopa wrote from one that came another way (a file given to `opa
run`, another client), and a policy's rules show up beside documents when read. So a kopa restarted beside
a running OPA could not know that a data ConfigMap deleted while no kopa ran had left its documents
behind, and OPA kept them for good. The ledger names each data ConfigMap kopa has written, as
`<namespace>/<name>`; the next kopa reads it and removes what no ConfigMap holds any more. It is written
before the documents it names and trimmed after they are removed, so a kopa killed in the middle of a batch
leaves an entry too many (whose removal finds nothing), never one too few.

Push mode only: a bundle is built from scratch, so nothing outlives the kopa that served it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from app.configmaps.data import DataApi
from app.jsonbytes import dumps
from app.model import ObjectKey

log = logging.getLogger(__name__)

LEDGER_PATH = ("system", "kopa_ledger")
FIELD = "dataConfigMaps"


@dataclass
class Ledger:
    opa: DataApi
    # What OPA's copy names, as far as this kopa knows (nothing in a new OPA process: none is there).
    written: frozenset[ObjectKey] = frozenset()
    read_done: bool = False  # whether this kopa has read what its predecessor left (once, at its start)

    async def read(self) -> set[ObjectKey]:
        """The ConfigMaps named in OPA's copy; entries that are not `<namespace>/<name>` are skipped."""
        held = await self.opa.get_data(LEDGER_PATH)
        entries = held.get(FIELD) if isinstance(held, dict) else None
        found: set[ObjectKey] = set()
        for entry in entries if isinstance(entries, list) else []:
            parts = entry.split("/") if isinstance(entry, str) else []
            if len(parts) == 2 and all(parts):
                found.add(ObjectKey(parts[0], parts[1]))
        self.written, self.read_done = frozenset(found), True
        if found:
            log.debug("the ledger in OPA names %d data ConfigMaps", len(found))
        return found

    def forget(self) -> None:
        """OPA restarted: the new process holds no ledger until it is written there."""
        self.written = frozenset()

    async def include(self, keys: Iterable[ObjectKey]) -> None:
        """Before writing documents: the ledger names at least these (and what it named)."""
        wanted = frozenset(keys)
        if not wanted <= self.written:
            await self._write(wanted | self.written)

    async def record(self, keys: Iterable[ObjectKey]) -> None:
        """After a batch: the ledger names exactly these."""
        wanted = frozenset(keys)
        if wanted != self.written:
            await self._write(wanted)

    async def _write(self, keys: frozenset[ObjectKey]) -> None:
        names = sorted(f"{key.namespace}/{key.name}" for key in keys)
        await self.opa.put_data(LEDGER_PATH, dumps({FIELD: names}))
        self.written = keys
