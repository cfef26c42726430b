"""The bundle files OPA downloads: gzipped tarballs in OPA's bundle format.

A snapshot holds `/.manifest` (revision and roots), `/data.json` (the whole data tree) and one `.rego` file
per module; a delta holds `/.manifest` and `/patch.json` (OPA's `{"data": [operations]}`), and OPA requires
a delta's roots to be those of the bundle it holds, and refuses policies in a delta. OPA's reader takes a
file as a module only when its name ends in `.rego`: a module `<ns>/<configmap>/<key>` is the file
`/<ns>/<configmap>/<key>` when the key ends in `.rego`, else that name plus `.rego` (or, should a ConfigMap
have both `x` and `x.rego`, `/<ns>/<configmap>/x/module.rego`).
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from app.bundle.state import Operation
from app.jsonbytes import dumps

COMPRESSION = 6


def module_files(ids: Sequence[str]) -> dict[str, str]:
    """Module id -> the file name it has in the bundle (see the module docstring)."""
    taken = set(ids)
    files = {}
    for module_id in ids:
        if module_id.endswith(".rego"):
            files[module_id] = "/" + module_id
        elif module_id + ".rego" in taken:
            files[module_id] = f"/{module_id}/module.rego"
        else:
            files[module_id] = f"/{module_id}.rego"
    return files


def _manifest(revision: str, roots: Sequence[str]) -> bytes:
    return orjson.dumps({"revision": revision, "roots": list(roots)})


def _tarball(files: list[tuple[str, bytes]]) -> bytes:
    raw = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=COMPRESSION, mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name, content in files:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return raw.getvalue()


def snapshot(revision: str, roots: Sequence[str], modules: Mapping[str, str], data: Any) -> bytes:
    """The whole bundle."""
    ids = sorted(modules)
    names = module_files(ids)
    files = [("/.manifest", _manifest(revision, roots)), ("/data.json", dumps(data))]
    files += [(names[i], modules[i].encode()) for i in ids]
    return _tarball(files)


def delta(revision: str, roots: Sequence[str], operations: Sequence[Operation]) -> bytes:
    """A delta bundle: the data operations that lead from the client's revision to `revision`. Never
    empty (OPA takes a bundle without operations for a snapshot, and would erase its data)."""
    if not operations:
        raise ValueError("a delta bundle needs at least one operation")
    patch = orjson.dumps({"data": [op.json() for op in operations]})
    return _tarball([("/.manifest", _manifest(revision, roots)), ("/patch.json", patch)])
