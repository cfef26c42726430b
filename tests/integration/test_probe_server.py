"""kopa's probe and metrics server as the kubelet meets it: on IPv4 and IPv6, and with slow clients around.

Only loopback addresses are contacted (127.0.0.1 and ::1), whatever address kopa listens on.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from functools import partial

import pytest

from app.server.http import IDLE_TIMEOUT, MAX_CONNECTIONS
from devstack.opa import OpaServer
from devstack.processes import free_port, wait_until
from tests.integration.conftest import KopaFactory

pytestmark = pytest.mark.integration

V4, V6 = "127.0.0.1", "[::1]"


def healthz(host: str, port: int) -> int:
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as response:
        return int(response.status)


def refused(host: str, port: int) -> bool:
    try:
        healthz(host, port)
    except urllib.error.URLError as exc:
        return isinstance(exc.reason, ConnectionRefusedError)
    return False


@pytest.mark.parametrize(
    ("endpoint", "answers"),
    [
        (":{port}", {V4: True, V6: True}),
        ("0.0.0.0:{port}", {V4: True, V6: True}),
        ("[::]:{port}", {V4: True, V6: True}),
        ("127.0.0.1:{port}", {V4: True, V6: False}),
        ("[::1]:{port}", {V4: False, V6: True}),
    ],
)
def test_probes_reach_kopa_over_ipv4_and_ipv6(
    run_kopa: KopaFactory, opa: OpaServer, namespace: str, endpoint: str, answers: dict[str, bool]
) -> None:
    """Every address (empty host, 0.0.0.0, [::]) means IPv4 and IPv6, as with kube-mgmt's Go listener, so
    the kubelet reaches kopa on an IPv6-only or IPv6-first cluster; a literal address binds just that."""
    port = free_port()
    address = endpoint.format(port=port)
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}", f"--health-endpoint={address}")
    for host in (h for h, answer in answers.items() if answer):
        wait_until(partial(healthz, host, port), timeout=30, what=f"/healthz on {host}:{port}")
    for host in (h for h, answer in answers.items() if not answer):
        assert refused(host, port), f"{host}:{port} answered, but kopa should listen on {address} only"


def _closed_by_kopa(sock: socket.socket) -> bool:
    """True once kopa has closed the connection (end of stream or reset); whatever it sent is skipped."""
    try:
        while chunk := sock.recv(65536, socket.MSG_DONTWAIT):
            del chunk
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    return True


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_slow_and_idle_clients_are_closed_and_probes_still_answer(
    run_kopa: KopaFactory, opa: OpaServer, namespace: str
) -> None:
    """300 clients that send half their headers and stop (a slowloris, or a broken proxy) must neither
    pile up in kopa nor keep the kubelet's probe out."""
    kopa = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    port = int(kopa.health_url.rpartition(":")[2])
    wait_until(lambda: healthz(V4, port) == 200, timeout=30, what="/healthz")
    assert kopa.pid is not None
    baseline = _open_fds(kopa.pid)

    # One client that completes a request and then keeps its connection open without a second one.
    idle = socket.create_connection((V4, port), timeout=5)
    idle.sendall(f"GET /healthz HTTP/1.1\r\nHost: {V4}:{port}\r\n\r\n".encode())
    assert idle.recv(65536).startswith(b"HTTP/1.1 200")
    slow = []
    try:
        for _ in range(300):
            sock = socket.create_connection((V4, port), timeout=5)
            sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {V4}:{port}\r\nX-Half: ".encode())
            slow.append(sock)

        # Meanwhile the probe answers, and kopa holds no more than its cap of connections.
        assert healthz(V4, port) == 200
        assert healthz(V4, port) == 200
        wait_until(
            lambda: _open_fds(kopa.pid or 0) <= baseline + MAX_CONNECTIONS + 5,
            timeout=10,
            what=f"kopa holding at most {MAX_CONNECTIONS} connections",
        )
        # Every half-sent request, and the idle keep-alive connection, is closed within the timeout.
        wait_until(
            lambda: all(_closed_by_kopa(s) for s in [idle, *slow]),
            timeout=IDLE_TIMEOUT + 10,
            what="kopa closing the half-sent and idle connections",
        )
        assert healthz(V4, port) == 200
    finally:
        for sock in [idle, *slow]:
            sock.close()
