"""A sidecar's own latency, seen on the wire: from the watch event's packet to the write's packet.

The churn phase's lag also holds the API server's acknowledgement, OPA's write and the sampler's
resolution (about a millisecond or more), all shared by both sidecars. This takes those out: a helper
process captures loopback packets (an AF_PACKET socket: root or CAP_NET_RAW; without it the figure is
left out and the bench says why) with their kernel timestamps, keeping only two kinds, picked by a
socket filter so that the sampler's thousand polls a second are never copied out of the kernel:

- TLS application data from the API server's port (a watch event, among others), and
- requests that start with "PATCH " or "PUT " going to OPA's port (a sidecar's writes).

Each write from the sidecar's ports is paired with the last TLS record the API server sent to the
sidecar's ports before it (within PAIR_WITHIN). Both ends are packets on loopback, so the time between
includes waking the sidecar, TLS, parsing, the sidecar's own work and writing the request: everything the
sidecar does for a change, nothing it does not.

The same capture holds the API server's answers to the updater (TLS records to its ports): the watch
packet's time relative to the answer of the update it carries is the API server's delivery, the part of
the lag before the sidecar gets the change (delivery_offsets).
"""

from __future__ import annotations

import bisect
import ctypes
import os
import re
import socket
import struct
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

PAIR_WITHIN = 0.02  # seconds: a write later than this after the last watch packet is not paired
ACK_WITHIN = 0.01  # seconds: an update's answer further than this from a watch packet is not its
SO_TIMESTAMPNS = 35
SO_ATTACH_FILTER = 26
ETH_P_ALL = 0x0003
TLS_DATA = 0x17030300  # a TLS 1.2/1.3 application-data record's first three bytes
PATCH, PUT = 0x50415443, 0x50555420  # "PATC", "PUT "

# A classic BPF program over Ethernet + IPv4 + TCP (the bench's servers listen on 127.0.0.1): keeps a packet
# whose TCP payload starts with PATC, "PUT " or a TLS application-data header, drops everything else.
# (code, jt, jf, k): ldb [23] (IP protocol); jeq 6 (TCP); x = IP header length; a = TCP data offset * 4;
# x = a + x; ld [x + 14] (the payload's first word); compare.
_FILTER = [
    (0x30, 0, 0, 23),
    (0x15, 0, 11, 6),
    (0xB1, 0, 0, 14),
    (0x50, 0, 0, 26),
    (0x54, 0, 0, 0xF0),
    (0x74, 0, 0, 2),
    (0x0C, 0, 0, 0),
    (0x07, 0, 0, 0),
    (0x40, 0, 0, 14),
    (0x15, 4, 0, PATCH),
    (0x15, 3, 0, PUT),
    (0x54, 0, 0, 0xFFFFFF00),
    (0x15, 1, 0, TLS_DATA),
    (0x06, 0, 0, 0),
    (0x06, 0, 0, 0x40000),
]


def _capture_socket() -> socket.socket:
    """The loopback capture socket, filtered; OSError (PermissionError) where raw sockets are refused."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.bind(("lo", 0))
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        program = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in _FILTER))
        sock.setsockopt(
            socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", len(_FILTER), ctypes.addressof(program))
        )
        sock.settimeout(0.2)
    except OSError:
        sock.close()
        raise
    return sock


def unavailable() -> str | None:
    """Why the bench cannot capture here (None: it can)."""
    try:
        _capture_socket().close()
    except (OSError, AttributeError) as exc:  # AttributeError: no AF_PACKET (not Linux)
        return f"no loopback capture ({type(exc).__name__}: {exc}; it needs root or CAP_NET_RAW)"
    return None


def capture_main(config: dict[str, Any], out: str, control: Connection) -> None:
    """Entry point of the capture helper: records [time, source port, destination port, kind] (kind "w" for
    a write to OPA, "t" for TLS data from the API server) until told to stop (any message)."""
    api_port, opa_port = config["api_port"], config["opa_port"]
    sock = _capture_socket()
    rows: list[tuple[float, int, int, str]] = []
    control.send("ready")
    while not control.poll():
        try:
            data, ancillary, _flags, address = sock.recvmsg(256, 64)
        except TimeoutError:
            continue
        if address[2] == socket.PACKET_OUTGOING:  # loopback shows each packet twice
            continue
        stamp = next(
            (struct.unpack("qq", v[:16]) for lvl, typ, v in ancillary if (lvl, typ) == (1, SO_TIMESTAMPNS)),
            None,
        )
        ip = data[14:]
        tcp = ip[(ip[0] & 0x0F) * 4 :]
        source, destination = struct.unpack("!HH", tcp[:4])
        first = tcp[(tcp[12] >> 4) * 4 :][:1]
        if first == b"\x17":
            kind = "t" if source == api_port else ""  # TLS to the API server (the updater's): not kept
        else:
            kind = "w" if destination == opa_port else ""
        if stamp is not None and kind:
            rows.append((stamp[0] + stamp[1] * 1e-9, source, destination, kind))
    sock.close()
    Path(out).write_bytes(orjson.dumps(rows))


def local_ports(pid: int) -> set[int]:
    """The local TCP ports of a process's sockets now (IPv4 and IPv6)."""
    inodes: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        found = re.fullmatch(r"socket:\[(\d+)\]", target)
        if found:
            inodes.add(found.group(1))
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def sidecar_pairs(rows: list[list[Any]], ports: set[int]) -> list[tuple[float, float]]:
    """(watch packet, write packet) times: each write the sidecar sent from its ports, with the API server's
    last TLS record to those ports before it (rows as capture_main wrote them, in time order)."""
    pairs: list[tuple[float, float]] = []
    last_in: float | None = None
    for at, source, destination, kind in rows:
        if kind == "t" and destination in ports:
            last_in = at
        elif kind == "w" and source in ports and last_in is not None and at - last_in <= PAIR_WITHIN:
            pairs.append((last_in, at))
    return pairs


def sidecar_delays(rows: list[list[Any]], ports: set[int]) -> list[float]:
    """Seconds from the watch packet to the sidecar's write (sidecar_pairs)."""
    return [write - watch for watch, write in sidecar_pairs(rows, ports)]


def delivery_offsets(rows: list[list[Any]], ports: set[int], updater: set[int]) -> list[float]:
    """Seconds from the API server's answer to an update (its TLS record to the updater's ports) to the
    watch packet the sidecar wrote after, for the answer nearest to it within ACK_WITHIN: negative when the
    watch event left first. The API server sends both once etcd has the change; their order, and so part of
    the lag, is its own and differs from run to run, whichever sidecar watches."""
    acks = [at for at, source, destination, kind in rows if kind == "t" and destination in updater]
    offsets: list[float] = []
    for watch, _write in sidecar_pairs(rows, ports):
        i = bisect.bisect_left(acks, watch)
        near = [ack for ack in acks[max(i - 1, 0) : i + 1] if abs(ack - watch) <= ACK_WITHIN]
        if near:
            offsets.append(watch - min(near, key=lambda ack: abs(ack - watch)))
    return offsets
