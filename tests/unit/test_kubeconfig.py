"""kopa's own kubeconfig reader (app/kube/kubeconfig.py, app/kube/auth.py, app/kube/config.py).

kopa no longer uses the official client's loaders (their import was half of its start-up), so these tests
pin what a kubeconfig means to it, as kubectl reads one: KUBECONFIG merged (first wins), paths relative to
the file that names them, the order of credentials, exec plugins run for real (scripts in a temp dir), OIDC
id-tokens refreshed at a loopback identity provider. tests/integration/test_kube_auth.py sends the
credentials to the real API server.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web

from app.kube import auth, config
from app.kube.config import KubeConfigError, KubeConnection, load_connection
from devstack.certs import TestCA
from devstack.processes import HOST
from tests.unit.polling import until

pytestmark = pytest.mark.anyio

SERVER = "https://127.0.0.1:6443"


def kubeconfig(
    path: Path,
    *,
    user: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
    namespace: str | None = None,
    current: str | None = "ctx",
    names: tuple[str, str, str] = ("ctx", "c", "u"),
) -> Path:
    """Writes a kubeconfig with one context `ctx` -> cluster `c`, user `u` (None: no users at all)."""
    ctx, cluster_name, user_name = names
    context: dict[str, Any] = {"cluster": cluster_name, "user": user_name}
    if namespace:
        context["namespace"] = namespace
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster_name, "cluster": cluster or {"server": SERVER}}],
        "contexts": [{"name": ctx, "context": context}],
        "users": [{"name": user_name, "user": user if user is not None else {"token": "t0ken"}}],
    }
    if current is not None:
        doc["current-context"] = current
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


async def load(path: Path | str, environ: dict[str, str] | None = None) -> KubeConnection:
    return await load_connection(str(path), environ={} if environ is None else environ)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


# --- files, merging, contexts -------------------------------------------------------------------------------


async def test_kubeconfig_files_merge_as_kubectl_merges_them(tmp_path: Path, ca: TestCA) -> None:
    """The first file to set current-context wins; the first to define a name wins it whole; missing files
    are skipped; a relative path is relative to the file that defined the entry."""
    first = tmp_path / "a" / "config"
    first.parent.mkdir()
    first.write_text(
        yaml.safe_dump(
            {
                "current-context": "ctx",
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u", "namespace": "team"}}],
                "users": [{"name": "u", "user": {"token": "from-the-first-file"}}],
            }
        )
    )
    second_dir = tmp_path / "b"
    second_dir.mkdir()
    (second_dir / "ca.crt").write_bytes(ca.ca_file.read_bytes())
    second = kubeconfig(
        second_dir / "config",
        current="elsewhere",
        cluster={"server": SERVER, "certificate-authority": "ca.crt"},  # relative to b/
        user={"token": "from-the-second-file"},
    )
    listed = os.pathsep.join(["", str(tmp_path / "missing"), str(first), str(second), str(first)])

    conn = await load("", {"KUBECONFIG": listed})

    assert conn.host == SERVER
    assert conn.namespace == "team"
    assert conn.authorization == "Bearer from-the-first-file"
    assert isinstance(conn.ssl_context, ssl.SSLContext)
    assert conn.source == listed


async def test_the_kubeconfig_flag_is_one_file_and_wins_over_KUBECONFIG(tmp_path: Path) -> None:
    flag = kubeconfig(tmp_path / "flag", user={"token": "flag"}, namespace="from-flag")
    env = kubeconfig(tmp_path / "env", user={"token": "env"})
    conn = await load(flag, {"KUBECONFIG": str(env)})
    assert conn.authorization == "Bearer flag"
    assert conn.namespace == "from-flag"
    with pytest.raises(KubeConfigError, match="no such file"):
        await load(os.pathsep.join([str(flag), str(env)]))
    with pytest.raises(KubeConfigError, match="not a file"):
        await load(tmp_path)


async def test_a_context_without_namespace_or_user(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text(
        yaml.safe_dump(
            {
                "current-context": "ctx",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:8080/"}}],
                "contexts": [{"name": "ctx", "context": {"cluster": "c"}}],
            }
        )
    )
    conn = await load(path)
    assert (conn.host, conn.namespace, conn.authorization, conn.ssl_context) == (
        "http://127.0.0.1:8080",
        "default",
        None,
        False,
    )


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("current-context: x\n", "'x' is not among the contexts"),
        ("clusters: [{name: c, cluster: {server: https://h}}]\n", "no current-context"),
        ("current-context: ctx\ncontexts: [{name: ctx, context: {cluster: nope}}]\n", "cluster 'nope'"),
        ("clusters: [\n", "not valid YAML"),
        ("- a list\n", "not a kubeconfig"),
        ("clusters: {c: 1}\n", "clusters in"),
    ],
)
async def test_a_broken_kubeconfig_is_one_line_naming_the_problem(
    tmp_path: Path, content: str, says: str
) -> None:
    path = tmp_path / "config"
    path.write_text(content)
    with pytest.raises(KubeConfigError) as caught:
        await load(path)
    message = str(caught.value)
    assert says in message and str(path) in message and "\n" not in message


@pytest.mark.parametrize(
    ("cluster", "host"),
    [
        ({"server": "localhost:6443", "insecure-skip-tls-verify": True}, "https://localhost:6443"),
        ({"server": "127.0.0.1:8080"}, "http://127.0.0.1:8080"),
        ({"server": "HTTPS://[::1]:6443/", "insecure-skip-tls-verify": True}, "https://[::1]:6443"),
    ],
)
async def test_a_server_is_read_as_kubectl_reads_it(
    tmp_path: Path, cluster: dict[str, Any], host: str
) -> None:
    conn = await load(kubeconfig(tmp_path / "config", cluster=cluster))
    assert conn.host == host


@pytest.mark.parametrize(
    ("server", "says"),
    [
        ("ftp://x", "must be an http:// or https:// URL"),
        ("https://::1:6443", "an IPv6 address goes in brackets"),
        ("https://admin:pa55word@127.0.0.1:6443", "has credentials in its URL"),
    ],
)
async def test_an_unusable_server_is_one_line_without_its_password(
    tmp_path: Path, server: str, says: str
) -> None:
    with pytest.raises(KubeConfigError) as caught:
        await load(kubeconfig(tmp_path / "config", cluster={"server": server}))
    message = str(caught.value)
    assert says in message and "cluster 'c'" in message and "pa55word" not in message


async def test_a_missing_user_is_named(tmp_path: Path) -> None:
    path = kubeconfig(tmp_path / "config", names=("ctx", "c", "u"))
    doc = yaml.safe_load(path.read_text())
    doc["users"] = []
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(KubeConfigError, match="user 'u'"):
        await load(path)


# --- credentials --------------------------------------------------------------------------------------------


async def test_token_beats_token_file_and_a_token_file_is_read_without_its_newline(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file\n")
    both = await load(kubeconfig(tmp_path / "both", user={"token": "inline", "tokenFile": "token"}))
    assert both.authorization == "Bearer inline"
    file_only = await load(kubeconfig(tmp_path / "file", user={"tokenFile": "token"}))
    assert file_only.authorization == "Bearer from-file"
    assert "from-file" not in repr(file_only)


async def test_username_and_password_are_basic_auth(tmp_path: Path) -> None:
    conn = await load(kubeconfig(tmp_path / "config", user={"username": "ann", "password": "s3cret"}))
    assert conn.authorization == "Basic " + b64(b"ann:s3cret")


@pytest.mark.parametrize("embedded", [False, True], ids=["files", "data"])
async def test_client_certificates_from_files_or_embedded(
    tmp_path: Path, ca: TestCA, *, embedded: bool
) -> None:
    cert, key = ca.issue(f"client-{embedded}", ips=(), dns=())
    if embedded:
        user = {"client-certificate-data": b64(cert.read_bytes()), "client-key-data": b64(key.read_bytes())}
        cluster = {"server": SERVER, "certificate-authority-data": b64(ca.ca_file.read_bytes())}
    else:
        user = {"client-certificate": str(cert), "client-key": str(key)}
        cluster = {"server": SERVER, "certificate-authority": str(ca.ca_file)}
    conn = await load(kubeconfig(tmp_path / "config", user=user, cluster=cluster))
    assert isinstance(conn.ssl_context, ssl.SSLContext)
    assert conn.authorization is None
    assert not [name for name in os.listdir(tempfile.gettempdir()) if name.startswith("kopa-client-")], (
        "no key left on disk"
    )


async def test_new_client_certificate_files_change_the_tls_fingerprint(tmp_path: Path, ca: TestCA) -> None:
    """cert-manager rewrites the files in place: the client must see new TLS settings and reconnect."""
    cert, key = ca.issue("rotating", ips=(), dns=())
    path = kubeconfig(tmp_path / "config", user={"client-certificate": str(cert), "client-key": str(key)})
    before = await load(path)
    other_cert, other_key = ca.issue("rotated", ips=(), dns=())
    cert.write_bytes(other_cert.read_bytes())
    key.write_bytes(other_key.read_bytes())
    assert (await load(path)).tls_fingerprint != before.tls_fingerprint


async def test_a_certificate_without_its_key_is_refused(tmp_path: Path, ca: TestCA) -> None:
    cert, _ = ca.issue("lonely", ips=(), dns=())
    with pytest.raises(KubeConfigError, match="without its key"):
        await load(kubeconfig(tmp_path / "config", user={"client-certificate": str(cert)}))


async def test_insecure_skip_tls_verify_and_tls_server_name_and_proxy(tmp_path: Path, ca: TestCA) -> None:
    cluster = {
        "server": SERVER,
        "insecure-skip-tls-verify": True,
        "tls-server-name": "api.example",
        "proxy-url": "http://me:pw@127.0.0.1:3128",
    }
    conn = await load(kubeconfig(tmp_path / "config", cluster=cluster))
    assert conn.ssl_context is False
    assert conn.server_name == "api.example"
    assert conn.proxy == "http://127.0.0.1:3128"
    assert conn.proxy_authorization == "Basic " + b64(b"me:pw")

    cert, key = ca.issue("insecure-client", ips=(), dns=())
    user = {"client-certificate": str(cert), "client-key": str(key)}
    with_cert = await load(kubeconfig(tmp_path / "config", cluster=cluster, user=user))
    assert isinstance(with_cert.ssl_context, ssl.SSLContext), "the client certificate is still presented"
    assert with_cert.ssl_context.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize(("name", "plugin"), [("gcp", "gke-gcloud-auth-plugin"), ("azure", "kubelogin")])
async def test_removed_auth_providers_name_their_exec_plugin(tmp_path: Path, name: str, plugin: str) -> None:
    with pytest.raises(KubeConfigError, match=plugin):
        await load(kubeconfig(tmp_path / "config", user={"auth-provider": {"name": name}}))


# --- exec plugins -------------------------------------------------------------------------------------------


def plugin_script(path: Path, body: str) -> Path:
    """An executable Python script: `info` is the parsed KUBERNETES_EXEC_INFO, `emit(status)` prints."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "info = json.loads(os.environ['KUBERNETES_EXEC_INFO'])\n"
        "def emit(status):\n"
        "    doc = {'apiVersion': info['apiVersion'], 'kind': 'ExecCredential', 'status': status}\n"
        "    print(json.dumps(doc))\n" + body
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def exec_user(command: str, **extra: Any) -> dict[str, Any]:
    return {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": command, **extra}}


async def test_an_exec_plugin_token_and_its_expiry(tmp_path: Path, ca: TestCA) -> None:
    """The command is relative to the kubeconfig; args and env reach it; provideClusterInfo hands it the
    cluster; the expirationTimestamp (nanoseconds, as Go may write them) says when to run it again."""
    plugin_script(
        tmp_path / "bin" / "plugin",
        "open(sys.argv[1], 'w').write(json.dumps({'info': info, 'env': os.environ['EXTRA'],"
        " 'stdin': sys.stdin.read()}))\n"
        "emit({'token': 'exec-token', 'expirationTimestamp': '2031-02-03T04:05:06.123456789Z'})\n",
    )
    seen = tmp_path / "seen.json"
    cluster = {
        "server": SERVER,
        "certificate-authority-data": b64(ca.ca_file.read_bytes()),
        "tls-server-name": "api.example",
        "extensions": [{"name": "client.authentication.k8s.io/exec", "extension": {"audience": "kopa"}}],
    }
    user = exec_user(
        "./bin/plugin", args=[str(seen)], env=[{"name": "EXTRA", "value": "yes"}], provideClusterInfo=True
    )
    conn = await load(kubeconfig(tmp_path / "config", user=user, cluster=cluster))

    assert conn.authorization == "Bearer exec-token"
    assert conn.expires_at == datetime(2031, 2, 3, 4, 5, 6, 123456, tzinfo=UTC).timestamp()
    said = json.loads(seen.read_text())
    assert said["env"] == "yes" and said["stdin"] == ""
    assert said["info"]["kind"] == "ExecCredential"
    assert said["info"]["spec"]["interactive"] is False
    assert said["info"]["spec"]["cluster"] == {
        "server": SERVER,
        "certificate-authority-data": cluster["certificate-authority-data"],
        "tls-server-name": "api.example",
        "config": {"audience": "kopa"},
    }


async def test_an_exec_plugin_is_run_again_at_each_load(tmp_path: Path) -> None:
    """A reload happens after a 401 or at expiry: both mean the plugin's last token is spent."""
    calls = tmp_path / "calls"
    plugin_script(
        tmp_path / "plugin",
        f"n = len(open({str(calls)!r}).read()) if os.path.exists({str(calls)!r}) else 0\n"
        f"open({str(calls)!r}, 'a').write('x')\n"
        "emit({'token': f'token-{n}'})\n",
    )
    path = kubeconfig(tmp_path / "config", user=exec_user(str(tmp_path / "plugin")))
    assert (await load(path)).authorization == "Bearer token-0"
    second = await load(path)
    assert second.authorization == "Bearer token-1"
    assert second.expires_at is None


async def test_an_exec_plugin_client_certificate(tmp_path: Path, ca: TestCA) -> None:
    cert, key = ca.issue("exec-client", ips=(), dns=())
    plugin_script(
        tmp_path / "plugin",
        f"emit({{'clientCertificateData': {cert.read_text()!r}, 'clientKeyData': {key.read_text()!r}}})\n",
    )
    conn = await load(
        kubeconfig(
            tmp_path / "config",
            user=exec_user(str(tmp_path / "plugin")),
            cluster={"server": SERVER, "certificate-authority": str(ca.ca_file)},
        )
    )
    assert conn.authorization is None
    assert isinstance(conn.ssl_context, ssl.SSLContext)


@pytest.mark.parametrize(
    ("body", "user_extra", "says"),
    [
        (
            "sys.stderr.write('no\\ncredentials for you\\n'); sys.exit(3)\n",
            {},
            "exited with 3: credentials for you",
        ),
        ("print('not json')\n", {}, "not JSON"),
        ("emit({})\n", {}, "neither a token nor a client certificate"),
        ("print(json.dumps({'apiVersion': 'v0', 'kind': 'ExecCredential', 'status': {}}))\n", {}, "'v0'"),
        ("emit({'token': 't', 'expirationTimestamp': 'soon'})\n", {}, "RFC 3339"),
        ("emit({'token': 't'})\n", {"interactiveMode": "Always"}, "needs a terminal"),
    ],
)
async def test_an_exec_plugin_that_fails_is_one_line(
    tmp_path: Path, body: str, user_extra: dict[str, Any], says: str
) -> None:
    plugin_script(tmp_path / "plugin", body)
    path = kubeconfig(tmp_path / "config", user=exec_user(str(tmp_path / "plugin"), **user_extra))
    with pytest.raises(KubeConfigError) as caught:
        await load(path)
    assert says in str(caught.value) and "\n" not in str(caught.value)


async def test_an_exec_plugin_that_hangs_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload must not wait for ever on a plugin (a prompt nobody answers, a dead network)."""
    monkeypatch.setattr(auth, "EXEC_TIMEOUT", 0.5)
    pid_file = tmp_path / "pid"
    plugin_script(
        tmp_path / "plugin",
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\nimport time\ntime.sleep(60)\n",
    )
    with pytest.raises(KubeConfigError, match=r"did not answer within 0\.5 s"):
        await load(kubeconfig(tmp_path / "config", user=exec_user(str(tmp_path / "plugin"))))
    pid = int(pid_file.read_text())

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    await until(gone)


async def test_a_missing_exec_plugin_shows_its_install_hint(tmp_path: Path) -> None:
    user = exec_user("kopa-no-such-plugin", installHint="Install it with:\n  brew install it")
    with pytest.raises(KubeConfigError, match=r"kopa-no-such-plugin.*Install it with:"):
        await load(kubeconfig(tmp_path / "config", user=user), {"PATH": str(tmp_path)})


async def test_an_unknown_exec_api_version_is_refused(tmp_path: Path) -> None:
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1alpha1", "command": "x"}}
    with pytest.raises(KubeConfigError, match="v1alpha1"):
        await load(kubeconfig(tmp_path / "config", user=user))


# --- OIDC ---------------------------------------------------------------------------------------------------


def jwt(exp: float | None, subject: str = "ann") -> str:
    def part(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(doc)).rstrip(b"=").decode()

    claims: dict[str, Any] = {"sub": subject} if exp is None else {"sub": subject, "exp": int(exp)}
    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


class FakeIdp:
    """An OIDC issuer on loopback: discovery, and a token endpoint that rotates refresh tokens (each one
    is good once), as strict identity providers do."""

    def __init__(self) -> None:
        self.url = ""
        self.valid_refresh = {"refresh-0"}
        self.refreshes = 0
        self.client_auth: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_post("/token", self._token)
        return app

    async def _discovery(self, _: web.Request) -> web.Response:
        return web.json_response({"issuer": self.url, "token_endpoint": f"{self.url}/token"})

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.client_auth.append(request.headers.get("Authorization", ""))
        refresh = str(form.get("refresh_token"))
        if form.get("grant_type") != "refresh_token" or refresh not in self.valid_refresh:
            return web.json_response({"error": "invalid_grant"}, status=400)
        self.valid_refresh.discard(refresh)
        self.refreshes += 1
        new_refresh = f"refresh-{self.refreshes}"
        self.valid_refresh.add(new_refresh)
        return web.json_response(
            {"id_token": jwt(time.time() + 3600, f"refreshed-{self.refreshes}"), "refresh_token": new_refresh}
        )


@asynccontextmanager
async def serving_idp() -> AsyncIterator[FakeIdp]:
    idp = FakeIdp()
    runner = web.AppRunner(idp.app(), shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    assert runner.addresses
    idp.url = f"http://{HOST}:{runner.addresses[0][1]}"
    try:
        yield idp
    finally:
        await runner.cleanup()


def oidc_user(**config: str) -> dict[str, Any]:
    return {"auth-provider": {"name": "oidc", "config": config}}


async def test_an_oidc_id_token_that_is_valid_is_sent_as_is(tmp_path: Path) -> None:
    exp = time.time() + 600
    token = jwt(exp)
    conn = await load(
        kubeconfig(tmp_path / "config", user=oidc_user(**{"id-token": token, "client-id": "k"}))
    )
    assert conn.authorization == f"Bearer {token}"
    assert conn.expires_at == int(exp) - auth.OIDC_EXPIRY_MARGIN


async def test_an_expired_oidc_id_token_is_refreshed_and_the_rotated_refresh_token_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "_refreshed", {})
    async with serving_idp() as idp:
        config = {
            "id-token": jwt(time.time() - 5),
            "refresh-token": "refresh-0",
            "client-id": "kopa",
            "client-secret": "sh",
            "idp-issuer-url": idp.url,
        }
        path = kubeconfig(tmp_path / "config", user=oidc_user(**config))

        first = await load(path)
        assert idp.refreshes == 1
        assert first.authorization == f"Bearer {auth._refreshed[(idp.url, 'kopa', 'refresh-0')][0]}"
        assert idp.client_auth == ["Basic " + b64(b"kopa:sh")]

        again = await load(path)  # the refreshed token is still good: no new refresh
        assert (again.authorization, idp.refreshes) == (first.authorization, 1)

        auth._refreshed[(idp.url, "kopa", "refresh-0")] = (jwt(time.time() - 5), "refresh-1")
        third = await load(path)  # expired again: refreshed with the rotated refresh token, not the file's
        assert idp.refreshes == 2
        assert third.authorization != first.authorization


async def test_oidc_without_a_usable_token_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "_refreshed", {})
    expired = oidc_user(**{"id-token": jwt(time.time() - 5), "client-id": "k"})
    with pytest.raises(KubeConfigError, match="has expired, and there is no refresh-token"):
        await load(kubeconfig(tmp_path / "config", user=expired))
    async with serving_idp() as idp:
        refused = oidc_user(
            **{"refresh-token": "not-known", "client-id": "k", "idp-issuer-url": idp.url, "id-token": ""}
        )
        with pytest.raises(KubeConfigError, match="HTTP 400 invalid_grant") as caught:
            await load(kubeconfig(tmp_path / "config", user=refused))
        assert "not-known" not in str(caught.value)


# --- in cluster ---------------------------------------------------------------------------------------------


async def test_in_cluster_over_ipv6_without_the_token_newline(
    tmp_path: Path, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "ca.crt").write_bytes(ca.ca_file.read_bytes())
    (account / "token").write_text("sa-token\n")
    monkeypatch.setattr(config, "SERVICE_ACCOUNT_DIR", account)
    conn = await load_connection("", {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"})
    assert conn.host == "https://[fd00::1]:443"
    assert conn.authorization == "Bearer sa-token"
    assert conn.namespace == "default"
