"""The floor: the least a program on kopa's HTTP stack (aiohttp + orjson) can do to fill OPA.

It lists the collection in pages of 500, puts it in kube-mgmt's layout (kind and apiVersion set,
managedFields dropped, so OPA receives the same document as from kopa) and sends it in one PUT. No watch,
no store, no retries: what it costs is what any replicator must pay. Run as a process, like kopa, so that
both are timed from their start, interpreter and imports included:

    python -m bench.floor --server URL --token-file F --ca-file F --opa-url URL [--field-selector S]

It prints its own breakdown (seconds) as one JSON line.

`--lean` adds the two transport savings kopa makes, so that what remains between kopa and it is kopa's
own work (start-up, conversion, bookkeeping): pages asked for uncompressed (Accept-Encoding: identity;
the API server gzips large responses otherwise) and the PUT streamed in pieces as it is produced, so OPA
parses while the rest is still being sent.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

STARTED = time.monotonic()


async def _pieces(tree: dict[str, dict[str, Any]]) -> AsyncIterator[bytes]:
    for i, (ns, objects) in enumerate(tree.items()):
        yield (b"{" if i == 0 else b",") + orjson.dumps(ns) + b":" + orjson.dumps(objects)
    yield b"}" if tree else b"{}"


async def fill(
    *, server: str, token: str, ca_file: str, opa_url: str, field_selector: str, path: str, lean: bool
) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=ca_file)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    if lean:
        headers["Accept-Encoding"] = "identity"
    params = {"limit": "500"}
    if field_selector:
        params["fieldSelector"] = field_selector
    tree: dict[str, dict[str, Any]] = {}
    pages = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as kube:
        while True:
            async with kube.get(f"{server}/api/v1/configmaps", params=params, headers=headers) as resp:
                resp.raise_for_status()
                page = orjson.loads(await resp.read())
            pages += 1
            for obj in page["items"]:
                obj["kind"] = "ConfigMap"
                obj["apiVersion"] = "v1"
                meta = obj["metadata"]
                meta.pop("managedFields", None)
                tree.setdefault(meta["namespace"], {})[meta["name"]] = obj
            token_ = page["metadata"].get("continue")
            if not token_:
                break
            params["continue"] = token_
    listed = time.monotonic()
    body: bytes | AsyncIterator[bytes] = _pieces(tree) if lean else orjson.dumps(tree)
    async with (
        aiohttp.ClientSession() as opa,
        opa.put(f"{opa_url}/v1/data/{path}", data=body, headers={"Content-Type": "application/json"}) as resp,
    ):
        resp.raise_for_status()
    done = time.monotonic()
    return {
        "objects": sum(len(v) for v in tree.values()),
        "pages": pages,
        "bytes": len(body) if isinstance(body, bytes) else None,
        "list_seconds": round(listed - STARTED, 4),
        "put_seconds": round(done - listed, 4),
        "total_seconds": round(done - STARTED, 4),
        "cpu_seconds": round(time.process_time(), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--opa-url", required=True)
    parser.add_argument("--field-selector", default="")
    parser.add_argument("--path", default="kubernetes/configmaps")
    parser.add_argument("--lean", action="store_true", help="uncompressed pages and a streamed PUT")
    args = parser.parse_args()
    token = Path(args.token_file).read_text().strip()
    result = asyncio.run(
        fill(
            server=args.server,
            token=token,
            ca_file=args.ca_file,
            opa_url=args.opa_url,
            field_selector=args.field_selector,
            path=args.path,
            lean=args.lean,
        )
    )
    print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    main()
