"""The fan-out prober: a helper process that makes one change at a time through the API server and polls
every OPA of a fleet until each answers with it.

Per change it merge-patches one object (keep-alive HTTPS to the API server), notes when the PATCH was sent
and acknowledged, then polls every OPA with `GET /v1/data/<path>` on one keep-alive connection each, each
OPA on its own cycle of INTERVAL (start to start; one poll in flight per OPA), until it answers with the
change. An OPA counts as having the change at the first poll whose answer equals the expected value; the
change cannot be in OPA before the previous poll to it was sent (before the PATCH, for the first poll), which
is the resolution. Sockets and a minimal HTTP/1.1 reader keep a poll of ten OPAs well under a millisecond of
this process's CPU (OPA's small answers always carry a Content-Length). Changes are GAP apart, so that each
one arrives alone, as an edit usually does.

Stdlib and orjson only: it runs in a fresh interpreter (multiprocessing spawn) next to the bench.
"""

from __future__ import annotations

import http.client
import selectors
import socket
import ssl
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

INTERVAL = 0.001
GAP = 0.1  # seconds between one change reaching every OPA and the next PATCH
WITHIN = 30.0  # seconds a change may take to reach every OPA before it counts as missed
ANSWER_WITHIN = 30.0  # seconds one poll may take


class OpaSocket:
    """One keep-alive connection to an OPA, with a reader for its answers (Content-Length bodies only)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def send(self, request: bytes) -> None:
        self.sock.sendall(request)

    def receive(self) -> Any:
        """The `result` of the next answer (None when undefined or not 200)."""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._read()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = -1
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length < 0:
            raise RuntimeError(f"an OPA answer without Content-Length: {head[:200]!r}")
        while len(rest) < length:
            rest += self._read()
        body, self.buffer = rest[:length], rest[length:]
        if head[9:12] != b"200":
            return None
        return orjson.loads(body).get("result")

    def _read(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RuntimeError("OPA closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def request_for(path: str) -> bytes:
    return f"GET /v1/data/{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def poll_fleet(
    opas: list[OpaSocket], path: str, expected: Any, since: float, within: float
) -> list[list[float] | None]:
    """Polls every OPA until each answers `expected` at data.<path>; per OPA [answered, previous poll sent,
    this poll sent] (None if it did not within `within` seconds). `since`: when the change was made. Each
    OPA is polled on its own cycle (the next poll INTERVAL after the previous one was sent, or at its answer
    when that took longer), so an OPA busy activating a bundle delays only its own polls."""
    request = request_for(path)
    seen: list[list[float] | None] = [None] * len(opas)
    previous = [since] * len(opas)  # the change cannot be in OPA before this poll was sent
    sent = [0.0] * len(opas)
    waiting: dict[int, float] = {}  # OPAs between polls: when the next poll is due
    deadline = time.monotonic() + within
    with selectors.DefaultSelector() as selector:
        for i, opa in enumerate(opas):
            selector.register(opa.sock, selectors.EVENT_READ, i)
            sent[i] = time.monotonic()
            opa.send(request)
        in_flight = set(range(len(opas)))
        while in_flight or waiting:
            if time.monotonic() > deadline:
                waiting.clear()  # no new polls; the answers in flight are still read
            for i, due in list(waiting.items()):
                if due <= time.monotonic():
                    del waiting[i]
                    sent[i] = time.monotonic()
                    opas[i].send(request)
                    in_flight.add(i)
            timeout = max(0.0, min(waiting.values()) - time.monotonic()) if waiting else ANSWER_WITHIN
            ready = selector.select(timeout)
            if not ready and not waiting:
                raise RuntimeError(f"an OPA did not answer a poll within {ANSWER_WITHIN:g} s")
            for key, _ in ready:
                i = key.data
                value = opas[i].receive()
                answered = time.monotonic()
                in_flight.discard(i)
                if value == expected:
                    seen[i] = [answered, previous[i], sent[i]]
                else:
                    previous[i] = sent[i]
                    waiting[i] = sent[i] + INTERVAL
    return seen


def prober_main(config: dict[str, Any], out: str, control: Connection) -> None:
    """Entry point: makes config["changes"] ([{api_path, patch, opa_path, expected}, ...]) one at a time
    and writes {rows: [{sent, acked, seen: [[answered, previous, polled], ...]}], cpu_seconds}."""
    context = ssl.create_default_context(cafile=config["ca_file"])
    api = http.client.HTTPSConnection(config["host"], config["port"], context=context, timeout=30)
    headers = {
        "Authorization": f"Bearer {config['token']}",
        "Content-Type": "application/merge-patch+json",
        "Accept": "application/json",
    }
    opas = [OpaSocket(port) for port in config["opa_ports"]]
    first = config["changes"][0]
    api.request("GET", first["api_path"], headers=headers)  # connected (TLS) before the first change
    api.getresponse().read()
    poll_fleet(opas, first["opa_path"], None, time.monotonic(), 0.0)  # one poll each: connected too
    control.send("ready")
    control.recv()
    rows = []
    for change in config["changes"]:
        body = orjson.dumps(change["patch"])
        sent = time.monotonic()
        api.request("PATCH", change["api_path"], body, headers)
        response = api.getresponse()
        payload = response.read()
        acked = time.monotonic()
        if response.status != 200:
            raise RuntimeError(f"PATCH {change['api_path']}: HTTP {response.status}: {payload[:300]!r}")
        seen = poll_fleet(opas, change["opa_path"], change["expected"], sent, config.get("within", WITHIN))
        rows.append({"sent": sent, "acked": acked, "seen": seen})
        time.sleep(config.get("gap", GAP))
    for opa in opas:
        opa.close()
    api.close()
    Path(out).write_bytes(orjson.dumps({"rows": rows, "cpu_seconds": time.process_time()}))
