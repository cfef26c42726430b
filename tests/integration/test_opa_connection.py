"""The link to OPA in its production shape: TLS verified by default, a bearer token (rotatable), mutual TLS.

The token must never show up in anything kopa prints.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes import client

from app.opa.client import OpaClient, OpaUnauthorized
from app.opa.credentials import ssl_context
from devstack.binaries import tool_path
from devstack.certs import TestCA
from devstack.kopa import KopaProcess
from devstack.opa import OpaServer
from devstack.processes import HOST, ManagedProcess, free_port, wait_until
from tests.integration.conftest import KopaFactory
from tests.integration.helpers import (
    OK,
    POLICY,
    annotations_of,
    get,
    log_text,
    metric,
    put_configmap,
    scrape,
    secure_args,
    start_up_error,
    swap_in,
    wait_data,
    wait_log,
    wait_status,
)

pytestmark = pytest.mark.integration


def test_production_shape_opa_loads_and_the_token_never_shows(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    kopa = run_kopa(*secure_args(secure_opa, namespace), "--replicate=v1/services")
    put_configmap(core_v1, namespace, "p", {"p.rego": "package securetest\n\nx := 1\n"}, POLICY)
    put_configmap(core_v1, namespace, "bad", {"b.rego": "package broken\n\nnot rego at all {\n"}, POLICY)
    assert wait_status(core_v1, namespace, "p") == OK
    wait_status(core_v1, namespace, "bad", lambda v: v != OK)
    wait_data(secure_opa, "securetest/x", 1)
    wait_data(secure_opa, "system/kopa/ready", True)
    assert secure_opa.token
    assert secure_opa.token not in kopa.log_path.read_text(), "the token leaked into kopa's output"
    assert secure_opa.token not in json.dumps(annotations_of(core_v1, namespace, "bad"))


def test_a_rotated_token_file_is_picked_up(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    assert secure_opa.token and secure_opa.token_file
    token_file = tmp_path / "token"
    token_file.write_text(secure_opa.token + "\n")
    args = secure_args(secure_opa, namespace)
    args[1] = f"--opa-auth-token-file={token_file}"
    kopa = run_kopa(*args)
    put_configmap(core_v1, namespace, "before", {"b.rego": "package rotate.before\n\nx := 1\n"}, POLICY)
    wait_data(secure_opa, "rotate/before/x", 1)

    # OPA now accepts only a new token (its authz policy is replaced), and the Secret is rotated.
    new_token = "rotated-" + secure_opa.token[::-1]
    authz = (
        (secure_opa.authz_file or Path())
        .read_text()
        .replace(json.dumps(secure_opa.token), json.dumps(new_token))
    )
    secure_opa.http().put("/v1/policies/authz.rego", authz)
    token_file.write_text(new_token + "\n")
    put_configmap(core_v1, namespace, "after", {"a.rego": "package rotate.after\n\nx := 2\n"}, POLICY)
    wait_until(
        lambda: secure_opa.http(token=new_token).get_json("/v1/data/rotate/after/x").get("result") == 2,
        timeout=30,
        what="a policy loaded with the rotated token",
    )
    assert new_token not in kopa.log_path.read_text()


def test_tls_is_verified_by_default(run_kopa: KopaFactory, secure_opa: OpaServer, namespace: str) -> None:
    args = [a for a in secure_args(secure_opa, namespace) if not a.startswith("--opa-ca-file")]
    kopa = run_kopa(*args)
    wait_log(kopa, "OPA is unreachable")
    assert (
        "CERTIFICATE_VERIFY_FAILED" in kopa.log_path.read_text() or "certificate" in kopa.log_path.read_text()
    )


def test_allow_insecure_skips_verification(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    args = [a for a in secure_args(secure_opa, namespace) if not a.startswith("--opa-ca-file")]
    run_kopa(*args, "--opa-allow-insecure")
    put_configmap(core_v1, namespace, "p", {"p.rego": "package insecure\n\nx := 1\n"}, POLICY)
    wait_data(secure_opa, "insecure/x", 1)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--opa-ca-file=/does/not/exist.pem"], "invalid --opa-ca-file /does/not/exist.pem"),
        (["--opa-auth-token-file=/does/not/exist"], "invalid --opa-auth-token-file /does/not/exist"),
        (["--opa-client-cert-file=/x.crt"], "mutual TLS needs --opa-client-key-file too"),
        (["--opa-auth-token=abc", "--opa-auth-token-file=/x"], "cannot be combined with --opa-auth-token"),
    ],
)
def test_unusable_connection_settings_stop_start_up(
    run_kopa: KopaFactory, opa: OpaServer, namespace: str, extra: list[str], expected: str
) -> None:
    kopa = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}", *extra, expect_exit=2)
    line = start_up_error(kopa)
    assert expected in line
    assert "abc" not in line, "a token given as a flag is never quoted back"


def test_an_opa_url_that_is_not_opas_api_is_never_taken_for_loaded(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """Without /v1, OPA's server answers 404 "page not found" to every call: an outage, said once with a
    hint, and never a policy reported loaded."""
    kopa = run_kopa(f"--opa-url={opa.api_url.removesuffix('/v1')}", f"--namespaces={namespace}")
    put_configmap(core_v1, namespace, "p", {"p.rego": "package wrongurl\n\nx := 1\n"}, POLICY)
    wait_log(kopa, "HTTP 404 without an OPA error (is --opa-url OPA's API")
    wait_until(
        lambda: metric(scrape(kopa), "kopa_opa_requests_total", code="404"),
        timeout=30,
        what="kopa's requests answered 404",
    )
    assert "crashed" not in log_text(kopa)
    assert OK not in json.dumps(annotations_of(core_v1, namespace, "p"))
    assert get(kopa, "/readyz")[0] == 503
    assert opa.http().get_json("/v1/policies")["result"] == []


def test_mutual_tls(run_kopa: KopaFactory, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path) -> None:
    """An OPA that accepts only clients with a certificate from its CA (kube-mgmt cannot talk to it)."""
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("opa")
    client_cert, client_key = ca.issue("kopa", ips=(), dns=())
    port = free_port()
    opa = ManagedProcess(
        "opa-mtls",
        [
            tool_path("opa"),
            "run",
            "--server",
            "--skip-version-check",
            f"--addr={HOST}:{port}",
            f"--tls-cert-file={cert}",
            f"--tls-private-key-file={key}",
            f"--tls-ca-cert-file={ca.ca_file}",
            "--authentication=tls",
        ],
        tmp_path / "opa.log",
    )
    with opa.start():
        url = f"https://{HOST}:{port}"
        base = [f"--opa-url={url}/v1", f"--opa-ca-file={ca.ca_file}", f"--namespaces={namespace}"]
        refused = run_kopa(*base)
        wait_log(refused, "OPA is unreachable")
        refused.stop()
        run_kopa(*base, f"--opa-client-cert-file={client_cert}", f"--opa-client-key-file={client_key}")
        put_configmap(core_v1, namespace, "p", {"p.rego": "package mtls\n\nx := 1\n"}, POLICY)
        assert wait_status(core_v1, namespace, "p") == OK


def _readyz(kopa: KopaProcess) -> int:
    try:
        with urllib.request.urlopen(kopa.health_url + "/readyz", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code)


def _config_requests(kopa: KopaProcess) -> float:
    """How many times kopa has asked OPA's /v1/config (the watchdog's poll), answered or not."""
    with urllib.request.urlopen(kopa.health_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if re.match(r'kopa_opa_requests_total\{.*endpoint="config"', line)
    )


def test_a_rotated_opa_ca_file_is_picked_up(
    run_kopa: KopaFactory, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    """cert-manager gives OPA a certificate from a new CA and rotates the CA file kopa trusts: kopa must
    follow without a restart, and a CA file caught half-written must not lose it the CA it has."""
    ca1, ca2 = TestCA(tmp_path / "ca1"), TestCA(tmp_path / "ca2", common_name="kopa test CA 2")
    secret = tmp_path / "secret"  # the kubelet's layout of a mounted Secret
    swap_in(secret, "..v1", {"ca.pem": ca1.ca_file.read_bytes()})
    with OpaServer.secure(tmp_path / "opa", ca=ca1) as opa:
        args = [a for a in secure_args(opa, namespace) if not a.startswith("--opa-ca-file")]
        kopa = run_kopa(*args, f"--opa-ca-file={secret / 'ca.pem'}", "--opa-check-interval=200ms")
        put_configmap(core_v1, namespace, "p", {"p.rego": "package rotateca\n\nx := 1\n"}, POLICY)
        wait_data(opa, "rotateca/x", 1)
        wait_until(lambda: _readyz(kopa) == 200, timeout=30, what="kopa ready")

        # OPA comes back with a certificate kopa's CA does not vouch for: kopa is unready.
        cert2, key2 = ca2.issue("opa", ips=[HOST], dns=["localhost"])
        assert opa.cert_file and opa.key_file
        shutil.copyfile(cert2, opa.cert_file)
        shutil.copyfile(key2, opa.key_file)
        opa.ca_file = ca2.ca_file
        opa.restart()
        wait_until(lambda: _readyz(kopa) == 503, timeout=30, what="kopa unready")

        # A writer that is not the kubelet leaves half a PEM in place: logged once, the old CA kept.
        pem2 = ca2.ca_file.read_bytes()
        (secret / "..v1" / "ca.pem").write_bytes(pem2[: len(pem2) // 2])
        wait_log(kopa, f"invalid --opa-ca-file {secret / 'ca.pem'}")
        polls = _config_requests(kopa)
        wait_until(
            lambda: _config_requests(kopa) >= polls + 10,
            timeout=30,
            what="kopa polling OPA, and so checking its CA file, a few more times",
        )

        # The rotation proper: CA2 swapped in atomically. kopa trusts the new OPA and refills it.
        swap_in(secret, "..v2", {"ca.pem": pem2})
        wait_until(lambda: _readyz(kopa) == 200, timeout=30, what="kopa ready again")
        wait_data(opa, "rotateca/x", 1)
        wait_data(opa, "system/kopa/ready", True)
        assert log_text(kopa).count("invalid --opa-ca-file") == 1, "a bad CA file is logged once"


@pytest.mark.anyio
async def test_a_large_write_with_a_refused_token_is_refused_not_an_outage(secure_opa: OpaServer) -> None:
    """The real OPA answers 401 before it reads a body, and then resets the connection when the body is
    large: kopa's client reports the refusal (OpaUnauthorized), as for a small write, and the same write
    with the right token goes through whole."""
    tls = ssl_context(ca_file=str(secure_opa.ca_file))
    row = b'"' + b"x" * 1000 + b'"'

    async def document() -> AsyncIterator[bytes]:
        yield b"{"
        for i in range(10_000):  # about 10 MB
            yield b'%s"k%d":%s' % (b"," if i else b"", i, row)
        yield b"}"

    async with OpaClient(secure_opa.api_url, token=lambda: "not-the-token", ssl_context=tls) as refused:
        with pytest.raises(OpaUnauthorized) as raised:
            await refused.put_data(["big"], document)
    assert raised.value.status == 401
    async with OpaClient(secure_opa.api_url, token=lambda: secure_opa.token, ssl_context=tls) as client_:
        await client_.put_data(["big"], document)
        assert len(await client_.get_data(["big"])) == 10_000


@pytest.mark.anyio
async def test_the_drift_checks_reads_see_what_a_get_sees(secure_opa: OpaServer) -> None:
    """keys and get_many (ad-hoc queries) answer what GET /v1/data answers, for names no query text can
    hold (quotes, brackets, slashes, non-ASCII), a false value, a path that is not an object, none at all."""
    tls = ssl_context(ca_file=str(secure_opa.ca_file))
    odd = ['a"b', "c]d", "e/f", "\u00fc \u00f1", "x\\y", "false-valued"]
    document = {name: {"n": i} for i, name in enumerate(odd)} | {"false-valued": False}
    async with OpaClient(secure_opa.api_url, token=lambda: secure_opa.token, ssl_context=tls) as opa:
        for path in (["k s", "ns 1"], ['k"s', "ns]1"]):  # OPA's GET refuses the second path (a quote)
            await opa.put_data(path, json.dumps(document).encode())
            assert sorted(await opa.keys(path) or []) == sorted(odd)
            assert await opa.get_many(path, [*odd, "missing"]) == document
            assert await opa.get_many(path, ["e/f"]) == {"e/f": {"n": 2}}
        assert await opa.get_data(["k s", "ns 1"]) == document
        await opa.put_data(["k", "text"], b'"not an object"')
        assert await opa.keys(["k", "text"]) is None
        assert await opa.keys(["k", "nothing"]) is None
        assert await opa.get_many(["k", "nothing"], ["a"]) == {}
