"""Bundle mode end to end: one kopa serving its bundle to several real OPAs (`opa run --server` with kopa as
their bundle service, long polling on, the token), a private validation OPA, and the real API server.

What each OPA activated is read from OPA itself: its REST API for policies and data, `/health?bundles`, and
its status log (`status.console`), whose bundle status says whether the last activation was a snapshot or a
delta (`type`). The OPAs also send their status reports to kopa (`status.service`), as the chart configures
them, and kopa's `/readyz` says which revision each runs.
"""

from __future__ import annotations

import json
import secrets
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from devstack.certs import TestCA
from devstack.kopa import KopaProcess
from devstack.opa import OpaHttp, OpaServer, bundle_config, kopa_service
from devstack.processes import HOST, free_port, wait_until
from tests.conftest import require_binaries
from tests.integration.conftest import KopaFactory
from tests.integration.helpers import (
    DATA,
    OK,
    POLICY,
    TIMEOUT,
    error_of,
    get,
    log_text,
    put_configmap,
    start_up_error,
    status_of,
    swap_in,
    wait_status,
)

pytestmark = pytest.mark.integration

HELLO = 'package kubernetes.example\n\ngreeting := data[NS].settings["s.json"].greeting\n'


def opa_config(service: dict[str, Any]) -> str:
    """An OPA configured with kopa (`service`, see `devstack.opa.kopa_service`) as its bundle and status
    service, as the chart does: long polling, and a short retry cap so that an OPA refused before kopa's
    first load asks again soon. Its status reports also go to its log (`console`)."""
    polling = {"min_delay_seconds": 1, "max_delay_seconds": 2, "long_polling_timeout_seconds": 10}
    return bundle_config(service, "kopa", polling, {"console": True, "service": "kopa"})


@dataclass
class Fleet:
    """kopa in bundle mode, its validation OPA, and the OPAs that download from it."""

    kopa: KopaProcess
    url: str
    token: str
    validation: OpaServer
    opas: list[OpaServer] = field(default_factory=list)
    tls_dir: Path | None = None  # kopa's certificate, key and client CA, as a mounted Secret (with TLS)

    def data(self, opa: OpaServer, path: str) -> Any:
        answer = opa.http().get_json(f"/v1/data/{path}")
        return answer.get("result") if isinstance(answer, dict) else None

    def converge(self, path: str, expected: Any) -> None:
        """Every OPA answers `expected` at data.<path>."""
        for opa in self.opas:
            wait_until(
                lambda opa=opa: self.data(opa, path) == expected,  # type: ignore[misc]
                timeout=TIMEOUT,
                what=f"{opa} data/{path} == {expected!r}",
            )

    def metric(self, name: str) -> float:
        _, text = get(self.kopa, "/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))

    def reported(self) -> dict[str, Any]:
        """The `opas` section of kopa's /readyz: the OPAs' status reports."""
        section: dict[str, Any] = json.loads(get(self.kopa, "/readyz")[1])["opas"]
        return section

    def states(self) -> dict[str, str]:
        """OPA instance id -> its state as kopa sees it (current, behind, failing)."""
        return {o["id"]: o["state"] for o in self.reported()["opas"]}

    def ids(self) -> list[str]:
        """Each OPA's instance id (`labels.id`, what it reports with), in the order of `opas`."""
        return [opa.http().get_json("/v1/config")["result"]["labels"]["id"] for opa in self.opas]


def activations(opa: OpaServer) -> list[dict[str, Any]]:
    """The bundle statuses OPA logged (status.console), oldest first."""
    found = []
    for line in opa.log_path.read_text(errors="replace").splitlines():
        if '"Status Log"' not in line:
            continue
        bundle = json.loads(line).get("bundles", {}).get("kopa")
        if bundle and bundle.get("active_revision"):
            found.append(bundle)
    return found


def bundle_request(url: str, token: str | None) -> int:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code)


def exchange(
    url: str, ca_file: Path, client: tuple[Path, Path] | None = None, token: str | None = None
) -> tuple[str, int]:
    """One new TLS connection to kopa and one GET of `url`: the common name of the certificate kopa served,
    and the HTTP status. A refused client raises ssl.SSLError or ConnectionError (with TLS 1.3 the server
    refuses a client certificate after the client's side of the handshake: at the first read)."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or HOST, parts.port or 443
    context = ssl.create_default_context(cafile=str(ca_file))
    if client is not None:
        context.load_cert_chain(*client)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = f"GET {parts.path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        certificate: dict[str, Any] = tls.getpeercert() or {}
        tls.sendall(request.encode())
        status_line = tls.recv(64).split(b"\r\n", 1)[0].split()
    if len(status_line) < 2:
        raise ConnectionError("closed without an answer")
    names = [value for rdn in certificate["subject"] for key, value in rdn if key == "commonName"]
    return names[0], int(status_line[1])


def refused(
    url: str, ca_file: Path, client: tuple[Path, Path] | None = None, token: str | None = None
) -> bool:
    """kopa refuses this client in the TLS handshake."""
    try:
        exchange(url, ca_file, client, token)
    except (ssl.SSLError, ConnectionError):
        return True
    return False


FleetFactory = Callable[..., Fleet]


@pytest.fixture
def start_fleet(run_kopa: KopaFactory, namespace: str, tmp_path: Path) -> Iterator[FleetFactory]:
    """Factory: start_fleet(opas=3, ca=None, client_certificates=False, token=True) starts kopa serving the
    bundle (policies checked by its validation OPA, `Fleet.validation`), replicating Services, and `opas`
    OPAs downloading it, each OPA (the validation OPA too) with the same kind of credentials. With `ca`:
    over TLS, kopa's certificate from `ca` in a directory laid out as the kubelet mounts a Secret
    (`Fleet.tls_dir`: tls.crt, tls.key, ca.crt); with `client_certificates` too, mutual TLS
    (--bundle-tls-ca-file), each OPA with a client certificate from `ca`; without `token`, no token at all.
    The OPAs are stopped after the test (kopa by run_kopa)."""
    require_binaries("opa")
    started: list[OpaServer] = []

    def start(
        *, opas: int = 3, ca: TestCA | None = None, client_certificates: bool = False, token: bool = True
    ) -> Fleet:
        secret = secrets.token_urlsafe(24)
        token_file = tmp_path / "bundle-token"
        token_file.write_text(secret + "\n", encoding="utf-8")
        port = free_port()
        args = [f"--bundle-token-file={token_file}"] if token else []
        tls_dir = tmp_path / "kopa-tls"
        if ca is not None:
            cert, key = ca.issue("kopa", ips=[HOST], dns=["localhost"])
            files = {
                "tls.crt": cert.read_bytes(),
                "tls.key": key.read_bytes(),
                "ca.crt": ca.ca_file.read_bytes(),
            }
            paths = swap_in(tls_dir, "..v1", files)
            args += [
                f"--bundle-tls-cert-file={paths['tls.crt']}",
                f"--bundle-tls-key-file={paths['tls.key']}",
            ]
            if client_certificates:
                args.append(f"--bundle-tls-ca-file={paths['ca.crt']}")
        url = f"{'https' if ca is not None else 'http'}://{HOST}:{port}"
        ca_file = ca.ca_file if ca is not None else None

        def service(name: str) -> dict[str, Any]:
            credentials: dict[str, Any] = {"bearer": {"token_path": str(token_file)}}
            headers = None
            if ca is not None and client_certificates:
                cert, key = ca.issue(name, ips=(), dns=())
                credentials = {"client_tls": {"cert": str(cert), "private_key": str(key)}}
                headers = {"Authorization": f"Bearer {secret}"} if token else None
            return kopa_service(url, credentials, ca_file, headers)

        validation = OpaServer.validation(tmp_path / "opa-validation", service("opa-validation"))
        started.append(validation)
        validation.start()
        kopa = run_kopa(
            f"--opa-url={validation.api_url}",
            f"--namespaces={namespace}",
            f"--bundle-endpoint={HOST}:{port}",
            f"--leader-election-namespace={namespace}",  # its Lease is the test's too
            "--replicate=v1/services",
            "--replicate-ignore-namespaces=default,kube-system,kube-public",
            *args,
        )
        fleet = Fleet(kopa, f"{url}/bundles/kopa", secret, validation, tls_dir=tls_dir)
        for i in range(opas):
            work = tmp_path / f"opa-{i}"
            work.mkdir()
            (work / "config.json").write_text(opa_config(service(f"opa-{i}")), encoding="utf-8")
            server = OpaServer(work, "plain", log_level="info", extra_args=("--config-file=config.json",))
            started.append(server)
            fleet.opas.append(server.start())
        return fleet

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def fleet(start_fleet: FleetFactory) -> Fleet:
    """kopa in bundle mode and three OPAs downloading from it."""
    return start_fleet()


def service(name: str, port: int) -> client.V1Service:
    spec = client.V1ServiceSpec(ports=[client.V1ServicePort(port=port)])
    return client.V1Service(metadata=client.V1ObjectMeta(name=name), spec=spec)


def test_opas_converge_on_policy_and_data_changes_and_data_changes_travel_as_deltas(
    fleet: Fleet, core_v1: client.CoreV1Api, namespace: str
) -> None:
    put_configmap(core_v1, namespace, "settings", {"s.json": '{"greeting": "hello"}'}, DATA)
    put_configmap(
        core_v1, namespace, "hello", {"hello.rego": HELLO.replace("NS", json.dumps(namespace))}, POLICY
    )
    core_v1.create_namespaced_service(namespace, service("web", 80))
    assert wait_status(core_v1, namespace, "hello") == OK
    fleet.converge("kubernetes/example/greeting", "hello")
    fleet.converge(f"kubernetes/services/{namespace}/web/spec/ports/0/port", 80)
    for opa in fleet.opas:
        assert opa.http().request("GET", "/health?bundles")[0] == 200

    # A data change: every OPA follows, with a delta.
    snapshots = fleet.metric('kopa_bundle_responses_total{kind="snapshot"}')
    put_configmap(core_v1, namespace, "settings", {"s.json": '{"greeting": "bonjour"}'}, DATA)
    fleet.converge("kubernetes/example/greeting", "bonjour")
    core_v1.patch_namespaced_service("web", namespace, {"metadata": {"labels": {"tier": "front"}}})
    fleet.converge(f"kubernetes/services/{namespace}/web/metadata/labels", {"tier": "front"})
    for opa in fleet.opas:
        wait_until(
            lambda opa=opa: activations(opa) and activations(opa)[-1]["type"] == "delta",  # type: ignore[misc]
            timeout=TIMEOUT,
            what=f"{opa} reports a delta activation",
        )
    assert fleet.metric('kopa_bundle_responses_total{kind="snapshot"}') == snapshots
    assert fleet.metric('kopa_bundle_responses_total{kind="delta"}') >= 2 * len(fleet.opas)

    # A policy change: a snapshot (a delta cannot carry policies).
    changed = HELLO.replace("NS", json.dumps(namespace)) + '\nlanguage := "fr"\n'
    put_configmap(core_v1, namespace, "hello", {"hello.rego": changed}, POLICY)
    fleet.converge("kubernetes/example/language", "fr")
    assert fleet.metric('kopa_bundle_responses_total{kind="snapshot"}') >= snapshots + len(fleet.opas)


def test_a_bad_module_never_reaches_the_opas_and_its_configmap_says_why(
    fleet: Fleet, core_v1: client.CoreV1Api, namespace: str
) -> None:
    put_configmap(core_v1, namespace, "good", {"good.rego": "package team.good\n\nallow := true\n"}, POLICY)
    put_configmap(
        core_v1, namespace, "bad", {"bad.rego": "package team.bad\n\nallow := no_such_func(1)\n"}, POLICY
    )
    put_configmap(
        core_v1, namespace, "authz", {"authz.rego": "package system.authz\n\nallow := true\n"}, POLICY
    )

    assert wait_status(core_v1, namespace, "good") == OK
    bad = error_of(wait_status(core_v1, namespace, "bad", lambda s: "error" in s))
    assert "no_such_func" in json.dumps(bad)
    refused = error_of(wait_status(core_v1, namespace, "authz", lambda s: "error" in s))
    assert refused["code"] == "bundle_root_error"
    assert "data.system" in refused["message"] and "reserved" in refused["message"]
    wait_until(
        lambda: any(
            e.reason == "LoadFailed" and e.involved_object.name == "authz"
            for e in core_v1.list_namespaced_event(namespace).items
        ),
        timeout=TIMEOUT,
        what="a LoadFailed Event on the authz ConfigMap",
    )

    fleet.converge("team/good/allow", True)
    for opa in fleet.opas:
        ids = {p["id"] for p in opa.http().get_json("/v1/policies")["result"]}
        assert ids == {f"kopa/{namespace}/good/good.rego"}  # OPA names a bundle's modules <bundle>/<file>
        assert all(a.get("code", "") == "" for a in activations(opa)), "OPA refused a bundle"

    # Fixed, it reaches them.
    put_configmap(core_v1, namespace, "bad", {"bad.rego": "package team.bad\n\nallow := false\n"}, POLICY)
    assert wait_status(core_v1, namespace, "bad") == OK
    fleet.converge("team/bad/allow", False)


def test_an_opa_restarted_from_scratch_is_complete_after_one_download(
    fleet: Fleet, core_v1: client.CoreV1Api, namespace: str
) -> None:
    put_configmap(core_v1, namespace, "settings", {"s.json": '{"greeting": "hello"}'}, DATA)
    put_configmap(
        core_v1, namespace, "hello", {"hello.rego": HELLO.replace("NS", json.dumps(namespace))}, POLICY
    )
    fleet.converge("kubernetes/example/greeting", "hello")
    snapshots = fleet.metric('kopa_bundle_responses_total{kind="snapshot"}')

    restarted = fleet.opas[0]
    restarted.restart()
    wait_until(
        lambda: restarted.http().request("GET", "/health?bundles")[0] == 200,
        timeout=TIMEOUT,
        what="the restarted OPA activated the bundle",
    )
    assert fleet.data(restarted, "kubernetes/example/greeting") == "hello"
    assert fleet.data(restarted, f"{namespace}/settings/s.json") == {"greeting": "hello"}
    assert fleet.metric('kopa_bundle_responses_total{kind="snapshot"}') == snapshots + 1


def test_the_token_is_required_and_never_logged(
    fleet: Fleet, core_v1: client.CoreV1Api, namespace: str
) -> None:
    put_configmap(core_v1, namespace, "settings", {"s.json": "{}"}, DATA)
    fleet.converge(f"{namespace}/settings/s.json", {})
    assert bundle_request(fleet.url, None) == 401
    assert bundle_request(fleet.url, "not-the-token") == 401
    assert bundle_request(fleet.url, fleet.token) == 200
    assert fleet.metric('kopa_bundle_responses_total{kind="unauthorized"}') >= 2
    status = OpaHttp(fleet.url.removesuffix("/bundles/kopa"), token=fleet.token)  # OPA's status API
    assert status.request("POST", "/status", {}, token=None) == (401, "a bearer token is required\n")
    answer = status.request("POST", "/status", b"{not json", content_type="application/json")
    assert answer[0] == 400 and answer[1].startswith("invalid status report: not JSON:")
    assert fleet.metric('kopa_bundle_status_reports_total{result="unauthorized"}') == 1
    assert fleet.token not in fleet.kopa.log_path.read_text(errors="replace")


def test_the_opas_report_to_kopa_which_revision_they_run(
    fleet: Fleet, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """Every OPA's status report reaches kopa: after each change `/readyz` shows each OPA on kopa's new
    revision, and the metric counts them. An OPA that refuses to activate a revision (a module pushed into it
    through its API calls a function the new revision no longer defines; kopa's validation OPA has no such
    module, so kopa accepts the change) shows as failing with OPA's error, and as current once it activates.
    None of this touches kopa's own readiness."""
    lib = "package team.lib\n\ndouble(x) := 2 * x\n"
    put_configmap(core_v1, namespace, "lib", {"lib.rego": lib}, POLICY)
    fleet.converge("team/lib", {})
    ids = fleet.ids()
    everyone_current = dict.fromkeys(ids, "current")
    wait_until(lambda: fleet.states() == everyone_current, timeout=TIMEOUT, what="every OPA current")
    first = fleet.reported()
    assert {o["revision"] for o in first["opas"]} == {first["revision"]}
    assert activations(fleet.opas[0])[-1]["active_revision"] == first["revision"]  # what OPA logs itself
    assert fleet.metric('kopa_bundle_opas{state="current"}') == 3

    put_configmap(core_v1, namespace, "lib", {"lib.rego": lib + "\nhalf(x) := x / 2\n"}, POLICY)
    wait_until(
        lambda: fleet.reported()["revision"] != first["revision"] and fleet.states() == everyone_current,
        timeout=TIMEOUT,
        what="every OPA current on the new revision",
    )
    second = fleet.reported()
    assert {o["revision"] for o in second["opas"]} == {second["revision"]}
    assert fleet.metric('kopa_bundle_opas{state="current"}') == 3
    assert (
        fleet.metric('kopa_bundle_opas{state="behind"}')
        == fleet.metric('kopa_bundle_opas{state="failing"}')
        == 0
    )

    refusing = fleet.opas[0]
    refusing.http().put(
        "/v1/policies/mine", "package mine\n\nfour := data.team.lib.double(2)\n", "text/plain"
    )
    put_configmap(core_v1, namespace, "lib", {"lib.rego": "package team.lib\n\ntriple(x) := 3 * x\n"}, POLICY)
    assert wait_status(core_v1, namespace, "lib") == OK
    wait_until(
        lambda: fleet.states() == {**everyone_current, ids[0]: "failing"},
        timeout=TIMEOUT,
        what="the refusing OPA failing, the others current",
    )
    third = fleet.reported()
    failing = next(o for o in third["opas"] if o["state"] == "failing")
    assert failing["revision"] == second["revision"] != third["revision"]
    assert failing["error"]["code"] == "bundle_error"
    assert any("undefined function data.team.lib.double" in e for e in failing["error"]["errors"])
    assert third["opas"][0]["id"] == ids[0]  # failing OPAs come first
    assert fleet.metric('kopa_bundle_opas{state="failing"}') == 1
    wait_until(lambda: fleet.metric("kopa_bundle_opa_lag_seconds") > 0, timeout=TIMEOUT, what="a lag")
    assert get(fleet.kopa, "/readyz")[0] == 200  # an OPA behind never makes kopa unready

    refusing.http().delete("/v1/policies/mine")
    wait_until(lambda: fleet.states() == everyone_current, timeout=TIMEOUT, what="the OPA current again")
    assert fleet.metric("kopa_bundle_opa_lag_seconds") == 0
    assert fleet.metric('kopa_bundle_status_reports_total{result="accepted"}') > 0


def test_a_restarted_validation_opa_changes_nothing_and_later_policies_compile_against_the_bundle(
    fleet: Fleet, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """The validation OPA keeps nothing across a restart: it downloads the candidate again (what the bundle
    holds), kopa compiles nothing, and the OPAs download nothing: the content is the same. A later policy
    is compiled against everything the bundle holds."""
    put_configmap(core_v1, namespace, "lib", {"lib.rego": "package team.lib\n\ndouble(x) := 2 * x\n"}, POLICY)
    fleet.converge("team/lib", {})
    snapshots = fleet.metric('kopa_bundle_responses_total{kind="snapshot"}')
    compiles = fleet.metric("kopa_bundle_compiles_total")

    fleet.validation.restart()
    wait_until(
        lambda: (
            {p["id"] for p in fleet.validation.http().get_json("/v1/policies")["result"]}
            == {f"kopa-validation/{namespace}/lib/lib.rego"}
        ),
        timeout=TIMEOUT,
        what="the validation OPA holds the candidate again",
    )
    wait_until(lambda: get(fleet.kopa, "/readyz")[0] == 200, timeout=TIMEOUT, what="kopa ready again")
    assert fleet.metric('kopa_bundle_responses_total{kind="snapshot"}') == snapshots
    assert fleet.metric("kopa_bundle_compiles_total") == compiles

    user = "package team.user\n\nfour := data.team.lib.double(2)\n"
    put_configmap(core_v1, namespace, "user", {"user.rego": user}, POLICY)
    assert wait_status(core_v1, namespace, "user") == OK
    fleet.converge("team/user/four", 4)


def test_an_unusable_bundle_endpoint_stops_start_up_with_one_line(
    run_kopa: KopaFactory, opa: OpaServer, namespace: str, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("t\n", encoding="utf-8")
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        common = [f"--opa-url={opa.api_url}", f"--namespaces={namespace}", f"--bundle-endpoint={HOST}:{port}"]
        missing = run_kopa(*common, f"--bundle-token-file={tmp_path / 'missing'}", expect_exit=2)
        assert start_up_error(missing).startswith(
            f"kopa: invalid --bundle-token-file {tmp_path / 'missing'}:"
        )
        busy = run_kopa(*common, f"--bundle-token-file={token_file}", expect_exit=2)
        assert start_up_error(busy).startswith(f"kopa: cannot serve the bundle on {HOST}:{port}:")


def test_the_bundle_over_tls(
    start_fleet: FleetFactory, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    """With --bundle-tls-cert-file/--bundle-tls-key-file the OPAs download over TLS, trusting kopa's CA."""
    fleet = start_fleet(opas=1, ca=TestCA(tmp_path / "ca"))
    assert fleet.url.startswith("https://")
    put_configmap(core_v1, namespace, "settings", {"s.json": '{"tls": true}'}, DATA)
    fleet.converge(f"{namespace}/settings/s.json", {"tls": True})


def test_mutual_tls_without_a_token(
    start_fleet: FleetFactory, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    """With --bundle-tls-ca-file and no token file, a client certificate alone admits an OPA: OPAs with
    `client_tls` credentials download the bundle and report their status. A client without a certificate,
    or with one from another CA, is refused in the handshake, and so is a real OPA without one. A rotated CA
    file is followed: the new CA's clients get in, the old one's no longer."""
    ca = TestCA(tmp_path / "ca")
    fleet = start_fleet(opas=2, ca=ca, client_certificates=True, token=False)
    put_configmap(core_v1, namespace, "settings", {"s.json": '{"mtls": true}'}, DATA)
    fleet.converge(f"{namespace}/settings/s.json", {"mtls": True})
    everyone_current = dict.fromkeys(fleet.ids(), "current")
    wait_until(lambda: fleet.states() == everyone_current, timeout=TIMEOUT, what="both OPAs reporting")

    admitted = ca.issue("client", ips=(), dns=())
    assert exchange(fleet.url, ca.ca_file, admitted) == ("kopa", 200)
    assert refused(fleet.url, ca.ca_file)
    other = TestCA(tmp_path / "other", common_name="another CA")
    foreign = other.issue("intruder", ips=(), dns=())
    assert refused(fleet.url, ca.ca_file, foreign)

    work = tmp_path / "opa-without-certificate"
    work.mkdir()
    base_url = fleet.url.removesuffix("/bundles/kopa")
    (work / "config.json").write_text(opa_config(kopa_service(base_url, {}, ca.ca_file)), encoding="utf-8")
    with OpaServer(work, "plain", log_level="info", extra_args=("--config-file=config.json",)) as outsider:
        wait_until(
            # Go's client sees the connection closed in the handshake (EOF) where kopa refuses it.
            lambda: "Bundle load failed: request failed" in outsider.log_path.read_text(errors="replace"),
            timeout=TIMEOUT,
            what="the OPA without a client certificate refused in the handshake",
        )
        assert outsider.http().request("GET", "/health?bundles")[0] != 200

    assert fleet.tls_dir is not None
    kept = {name: (fleet.tls_dir / name).read_bytes() for name in ("tls.crt", "tls.key")}
    swap_in(fleet.tls_dir, "..v2", {**kept, "ca.crt": other.ca_file.read_bytes()})
    wait_until(
        lambda: not refused(fleet.url, ca.ca_file, foreign),
        timeout=TIMEOUT,
        what="a client of the new CA admitted",
    )
    assert refused(fleet.url, ca.ca_file, admitted)


def test_mutual_tls_and_the_token(
    start_fleet: FleetFactory, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    """With --bundle-tls-ca-file and a token file, an OPA needs both: a client certificate, and the token
    (OPA takes one credentials method per service, so the token goes as a header)."""
    ca = TestCA(tmp_path / "ca")
    fleet = start_fleet(opas=1, ca=ca, client_certificates=True)
    put_configmap(core_v1, namespace, "settings", {"s.json": '{"both": true}'}, DATA)
    fleet.converge(f"{namespace}/settings/s.json", {"both": True})
    admitted = ca.issue("client", ips=(), dns=())
    assert exchange(fleet.url, ca.ca_file, admitted) == ("kopa", 401)
    assert exchange(fleet.url, ca.ca_file, admitted, fleet.token) == ("kopa", 200)
    assert refused(fleet.url, ca.ca_file, token=fleet.token)


def test_a_rotated_serving_certificate_reaches_new_connections(
    start_fleet: FleetFactory, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    """cert-manager renews kopa's certificate: new connections get the new one without a restart. A file
    caught half written is logged once and the certificate in use is kept."""
    ca = TestCA(tmp_path / "ca")
    fleet = start_fleet(opas=1, ca=ca)
    put_configmap(core_v1, namespace, "settings", {"s.json": '{"v": 1}'}, DATA)
    fleet.converge(f"{namespace}/settings/s.json", {"v": 1})
    assert exchange(fleet.url, ca.ca_file, token=fleet.token) == ("kopa", 200)

    assert fleet.tls_dir is not None
    in_place = (fleet.tls_dir / "tls.crt").resolve()
    pem = in_place.read_bytes()
    in_place.write_bytes(pem[: len(pem) // 2])
    wait_until(  # kopa looks at its files when a connection comes, at most once a second
        lambda: (
            exchange(fleet.url, ca.ca_file, token=fleet.token)[0] == "kopa"
            and "invalid --bundle-tls-cert-file" in log_text(fleet.kopa)
        ),
        timeout=TIMEOUT,
        what="the half-written certificate refused, the old one still served",
    )

    cert, key = ca.issue("kopa-renewed", ips=[HOST], dns=["localhost"])
    renewed = {"tls.crt": cert.read_bytes(), "tls.key": key.read_bytes(), "ca.crt": ca.ca_file.read_bytes()}
    swap_in(fleet.tls_dir, "..v2", renewed)
    wait_until(
        lambda: exchange(fleet.url, ca.ca_file, token=fleet.token)[0] == "kopa-renewed",
        timeout=TIMEOUT,
        what="the renewed certificate served",
    )
    assert log_text(fleet.kopa).count("invalid --bundle-tls-cert-file") == 1, "a bad file is logged once"
    put_configmap(core_v1, namespace, "settings", {"s.json": '{"v": 2}'}, DATA)
    fleet.converge(f"{namespace}/settings/s.json", {"v": 2})


def test_policies_present_at_start_are_checked_in_a_few_compiles_not_one_per_module(
    start_fleet: FleetFactory, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """Loading is linear in the number of modules: the validation OPA compiles the whole candidate once
    (plus the rounds that find the broken module), where pushing them one by one would compile N times."""
    for i in range(40):
        put_configmap(
            core_v1, namespace, f"p{i}", {"p.rego": f"package team.p{i}\n\nallow := true\n"}, POLICY
        )
    put_configmap(
        core_v1, namespace, "broken", {"p.rego": "package team.broken\n\nallow := nope(1)\n"}, POLICY
    )

    fleet = start_fleet(opas=1)
    for i in range(40):
        assert wait_status(core_v1, namespace, f"p{i}") == OK
    assert "nope" in json.dumps(error_of(wait_status(core_v1, namespace, "broken", lambda s: "error" in s)))
    fleet.converge("team/p39/allow", True)
    assert fleet.data(fleet.opas[0], "team/broken") is None
    assert fleet.metric("kopa_bundle_compiles_total") <= 4


def test_a_module_conflicting_with_one_the_bundle_holds_is_refused_and_the_held_one_stays(
    fleet: Fleet, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """As in push mode, the module that came later is refused, whichever of the two OPA's error names."""
    put_configmap(core_v1, namespace, "zz-held", {"p.rego": "package team.c\n\nf := 1\n"}, POLICY)
    assert wait_status(core_v1, namespace, "zz-held") == OK
    fleet.converge("team/c/f", 1)

    put_configmap(core_v1, namespace, "aa-late", {"p.rego": "package team.c\n\nf(x) := x\n"}, POLICY)
    late = error_of(wait_status(core_v1, namespace, "aa-late", lambda s: "error" in s))
    assert "conflicting rules" in json.dumps(late)
    assert late["errors"][0]["location"]["file"] in {
        f"{namespace}/zz-held/p.rego",
        f"{namespace}/aa-late/p.rego",
    }
    assert status_of(core_v1, namespace, "zz-held") == OK
    put_configmap(core_v1, namespace, "after", {"p.rego": "package team.after\n\nok := true\n"}, POLICY)
    fleet.converge("team/after/ok", True)
    fleet.converge("team/c/f", 1)


def test_a_validation_opa_that_does_not_download_the_candidate_keeps_kopa_unready_and_says_why(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    """The `opa` fixture's OPA has no configuration: kopa cannot have a policy checked, so it never serves
    a bundle without it; it says what is missing (as an error once) and stays unready."""
    token_file = tmp_path / "bundle-token"
    token_file.write_text(secrets.token_urlsafe(24), encoding="utf-8")
    put_configmap(core_v1, namespace, "p", {"p.rego": "package team.p\n\nallow := true\n"}, POLICY)
    kopa = run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        f"--bundle-endpoint={HOST}:{free_port()}",
        f"--bundle-token-file={token_file}",
        f"--leader-election-namespace={namespace}",
    )
    problem = "the validation OPA at --opa-url has no bundle with resource 'bundles/kopa-validation'"
    wait_until(
        lambda: problem in kopa.log_path.read_text(errors="replace"),
        timeout=TIMEOUT,
        what="the problem logged",
    )
    assert get(kopa, "/readyz")[0] == 503
    errors = [line for line in kopa.log_path.read_text(errors="replace").splitlines() if " ERROR " in line]
    assert len(errors) == 1 and problem in errors[0]  # the writer's retries say it as warnings


def test_a_rule_where_replicated_data_is_is_refused_and_the_opas_never_refuse_the_bundle(
    fleet: Fleet, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """OPA refuses to activate a bundle whose rule lies at a data path; kopa keeps such a module out and
    says so on its ConfigMap, as OPA's answer to the PUT would in push mode. (Had the module come first,
    the collection's write would be refused instead, in OPA's words too, as in push mode.)"""
    wait_until(
        lambda: isinstance(fleet.data(fleet.opas[0], "kubernetes/services"), dict),
        timeout=TIMEOUT,
        what="the replicated Services in the bundle",
    )
    put_configmap(core_v1, namespace, "clash", {"p.rego": "package kubernetes\n\nservices := 1\n"}, POLICY)
    put_configmap(core_v1, namespace, "fine", {"p.rego": "package team.fine\n\nok := true\n"}, POLICY)
    clash = error_of(wait_status(core_v1, namespace, "clash", lambda s: "error" in s))
    assert clash["errors"][0]["message"] == "conflicting rule for data path kubernetes/services found"
    assert wait_status(core_v1, namespace, "fine") == OK
    fleet.converge("team/fine/ok", True)
    for opa in fleet.opas:
        assert all(a.get("code", "") == "" for a in activations(opa)), "OPA refused a bundle"
