"""Where the Kubernetes API is and how to authenticate: kubeconfig, KUBECONFIG, or the pod's ServiceAccount.

kopa reads these itself (app/kube/kubeconfig.py, app/kube/auth.py) and keeps only the few values it needs to
open its own aiohttp session; it loads them again when credentials rotate or expire. It used the official
client's loaders before, whose import alone was half of kopa's start-up (docs/benchmarks.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiohttp

from app.http1 import url_host
from app.kube.auth import Credential, exec_credential, oidc_credential
from app.kube.kubeconfig import Entry, KubeconfigInvalid, Selected, kubeconfig_files, read_kubeconfig

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# aiohttp speaks to HTTP proxies (CONNECT for https:// API servers) and to HTTPS proxies (TLS to the proxy,
# then TLS inside). SOCKS would need another dependency.
PROXY_SCHEMES = ("http", "https")
# Auth providers that kubectl itself dropped (Kubernetes 1.26) in favour of exec plugins.
REMOVED_PROVIDERS = {"gcp": "gke-gcloud-auth-plugin", "azure": "kubelogin"}


class KubeConfigError(Exception):
    """The connection settings cannot be loaded; str() is one line for the user."""


@dataclass(frozen=True)
class KubeConnection:
    """Everything needed to talk to one API server; cheap to rebuild when a token rotates."""

    host: str
    authorization: str | None = field(repr=False)  # the whole header value, e.g. "Bearer ..."
    ssl_context: ssl.SSLContext | bool
    namespace: str  # the context's namespace (out of cluster) or the pod's (in cluster)
    source: str  # what was loaded, for log lines: a kubeconfig path or "in-cluster"
    # A digest of what ssl_context was built from (verify flag, CA, client certificate and key): the
    # context is a new object at every load, so this is what says whether TLS changed.
    tls_fingerprint: str = ""
    server_name: str | None = None  # kubeconfig tls-server-name: the name the certificate must carry
    proxy: str | None = None  # kubeconfig proxy-url, without credentials
    proxy_authorization: str | None = field(default=None, repr=False)  # from the proxy-url's user info
    # When the credentials expire (time.time()): an exec plugin's expirationTimestamp, an OIDC id-token's
    # exp. The client loads them again before sending them after that. None: until a 401.
    expires_at: float | None = None


@dataclass(frozen=True)
class _Tls:
    """What the TLS context is built from, as bytes (PEM), so that a digest of it says when it changed."""

    https: bool
    verify: bool = True
    ca: bytes = b""  # empty: the system's CAs
    certificate: bytes = field(default=b"", repr=False)
    key: bytes = field(default=b"", repr=False)
    # Where the certificate and key came from, when both are files: loaded from there, never copied.
    files: tuple[Path, Path] | None = None

    def context(self) -> ssl.SSLContext | bool:
        if not self.https or (not self.verify and not self.certificate):
            return False
        context = ssl.create_default_context(cadata=self.ca.decode("ascii") if self.ca else None)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.certificate:
            if self.files is not None:
                context.load_cert_chain(*self.files, password=_no_password)
            else:
                _load_cert_chain_from_memory(context, self.certificate, self.key)
        return context

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(f"{self.https}|{self.verify}".encode())
        for part in (self.ca, self.certificate, self.key):
            digest.update(b"|" + hashlib.sha256(part).digest())
        return digest.hexdigest()


def _no_password() -> bytes:
    raise ValueError("the client key is encrypted: kopa has no way to ask for its password")


def _load_cert_chain_from_memory(context: ssl.SSLContext, certificate: bytes, key: bytes) -> None:
    """Python's ssl loads a client certificate only from a file: this one lives just long enough to be read,
    readable by kopa alone (mkstemp makes it 0600)."""
    with tempfile.NamedTemporaryFile(prefix="kopa-client-", suffix=".pem") as pem:
        pem.write(certificate.rstrip(b"\n") + b"\n" + key)
        pem.flush()
        context.load_cert_chain(pem.name, password=_no_password)


def _proxy(url: str | None) -> tuple[str | None, str | None]:
    """The proxy-url without its user info, and a Proxy-Authorization header made from that user info."""
    if not url:
        return None, None
    try:
        parsed = urlsplit(url)
        port = parsed.port
    except ValueError:
        raise ValueError("proxy-url is not a valid URL") from None
    if parsed.scheme not in PROXY_SCHEMES or not parsed.hostname:
        scheme = parsed.scheme or "(none)"
        raise ValueError(
            f"proxy-url scheme {scheme} is not supported: use an http:// or https:// proxy (SOCKS is not)"
        )
    authorization = None
    if parsed.username is not None:
        user, password = unquote(parsed.username), unquote(parsed.password or "")
        authorization = aiohttp.encode_basic_auth(user, password)
    host = url_host(parsed.hostname)
    netloc = f"{host}:{port}" if port is not None else host
    return parsed._replace(netloc=netloc).geturl(), authorization


def _in_cluster(env: dict[str, str]) -> bool:
    return bool(env.get("KUBERNETES_SERVICE_HOST")) and (SERVICE_ACCOUNT_DIR / "token").exists()


async def load_connection(kubeconfig: str, environ: dict[str, str] | None = None) -> KubeConnection:
    """Finds the API server as kubectl does: --kubeconfig, KUBECONFIG, in-cluster, then ~/.kube/config."""
    env = dict(os.environ if environ is None else environ)
    where = kubeconfig or env.get("KUBECONFIG", "")
    try:
        if not where and _in_cluster(env):
            where = "in-cluster configuration"
            return _in_cluster_connection(env)
        if not kubeconfig:
            where = where or str(Path.home() / ".kube" / "config")
        files = _files(kubeconfig, where)
        if not files:
            raise KubeConfigError(f"cannot load the kubeconfig {where}: {_not_found(kubeconfig)}")
        return await _kubeconfig_connection(read_kubeconfig(files), where)
    except (OSError, ssl.SSLError, ValueError) as exc:  # KubeconfigInvalid and CredentialError included
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KubeConfigError(f"cannot load Kubernetes connection from {where}: {detail}") from exc


def _not_found(kubeconfig: str) -> str:
    return "not a file" if kubeconfig and Path(kubeconfig).expanduser().exists() else "no such file"


def _files(kubeconfig: str, kubeconfig_env: str) -> list[Path]:
    """--kubeconfig is one file, as with kubectl; KUBECONFIG (or the default) a list to merge. Local
    files of a few KB: read without a thread, at start-up and at each reload."""
    if kubeconfig:
        path = Path(kubeconfig).expanduser()
        return [path] if path.is_file() else []
    return kubeconfig_files(kubeconfig_env)


def _in_cluster_connection(env: dict[str, str]) -> KubeConnection:
    """The pod's ServiceAccount, read afresh at every load: the kubelet rotates the projected token file."""
    host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "")
    if not port:
        raise KubeconfigInvalid("KUBERNETES_SERVICE_PORT is not set")
    token = (SERVICE_ACCOUNT_DIR / "token").read_text().strip()
    if not token:
        raise KubeconfigInvalid(f"the service account token {SERVICE_ACCOUNT_DIR / 'token'} is empty")
    ca = (SERVICE_ACCOUNT_DIR / "ca.crt").read_bytes()
    if not ca.strip():
        raise KubeconfigInvalid(f"the service account CA {SERVICE_ACCOUNT_DIR / 'ca.crt'} is empty")
    namespace_file = SERVICE_ACCOUNT_DIR / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.exists() else "default"
    tls = _Tls(https=True, ca=ca)
    return KubeConnection(
        host=f"https://{url_host(host)}:{port}",
        authorization=f"Bearer {token}",
        ssl_context=tls.context(),
        namespace=namespace,
        source="in-cluster service account",
        tls_fingerprint=tls.fingerprint(),
    )


async def _kubeconfig_connection(selected: Selected, source: str) -> KubeConnection:
    cluster, user = selected.cluster, selected.user
    server = _server(cluster, user)
    credential = await _credential(user, cluster)
    insecure = cluster.fields.get("insecure-skip-tls-verify", False)
    if not isinstance(insecure, bool):
        raise KubeconfigInvalid(f"insecure-skip-tls-verify of cluster {cluster.name!r} must be true or false")
    tls = _tls(server, not insecure, cluster, user, credential)
    proxy, proxy_authorization = _proxy(cluster.text("proxy-url"))
    authorization = f"Bearer {credential.token}" if credential.token else _basic_auth(user)
    return KubeConnection(
        host=server,
        authorization=authorization,
        ssl_context=tls.context(),
        namespace=selected.namespace,
        source=source,
        tls_fingerprint=tls.fingerprint(),
        server_name=cluster.text("tls-server-name") or None,
        proxy=proxy,
        proxy_authorization=proxy_authorization,
        expires_at=credential.expires_at,
    )


def _server(cluster: Entry, user: Entry) -> str:
    """The cluster's server URL, read as kubectl reads it: without a scheme it is https:// when TLS is
    configured (a CA, a client certificate, insecure-skip-tls-verify), http:// otherwise."""
    server = cluster.text("server").rstrip("/")
    name = cluster.name
    if not server:
        raise KubeconfigInvalid(f"cluster {name!r} has no server")
    if "://" not in server:
        tls_keys = ("certificate-authority", "certificate-authority-data", "insecure-skip-tls-verify")
        client_keys = ("client-certificate", "client-certificate-data")
        tls = any(cluster.fields.get(k) for k in tls_keys) or any(user.fields.get(k) for k in client_keys)
        server = ("https://" if tls else "http://") + server
    try:
        parts = urlsplit(server)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise KubeconfigInvalid(
            f"the server of cluster {name!r} is not a valid URL (an IPv6 address goes in brackets: "
            "https://[::1]:6443)"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise KubeconfigInvalid(f"the server of cluster {name!r} must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        # Not quoted: the URL holds a password.
        raise KubeconfigInvalid(
            f"the server of cluster {name!r} has credentials in its URL: give them as the user's "
            "token, username and password, or client certificate"
        )
    return parts.geturl()  # the scheme in lower case, as _tls reads it


async def _credential(user: Entry, cluster: Entry) -> Credential:
    """The user's token, in kubectl's order of preference: an auth-provider, an exec plugin, then the
    kubeconfig's own token (a token beats a tokenFile). Username and password are _basic_auth's."""
    provider = user.fields.get("auth-provider")
    if provider is not None:
        name = provider.get("name") if isinstance(provider, dict) else None
        if name == "oidc":
            return await oidc_credential(user)
        if name in REMOVED_PROVIDERS:
            raise KubeconfigInvalid(
                f"the {name} auth-provider of user {user.name!r} was removed from Kubernetes (1.26): "
                f"use its exec plugin, {REMOVED_PROVIDERS[name]}"
            )
        raise KubeconfigInvalid(f"the auth-provider {name!r} of user {user.name!r} is not supported")
    if "exec" in user.fields:
        return await exec_credential(user, cluster)
    token = user.text("token")
    token_file = user.path("tokenFile")
    if not token and token_file is not None:
        token = token_file.read_text().strip()
    return Credential(token=token)


def _basic_auth(user: Entry) -> str | None:
    username, password = user.text("username"), user.text("password")
    return aiohttp.encode_basic_auth(username, password) if username else None


def _tls(server: str, verify: bool, cluster: Entry, user: Entry, credential: Credential) -> _Tls:
    """The CA from the cluster; the client certificate from the exec plugin, else from the user. Embedded
    data wins over a file when both are given, as with kubectl."""
    if not server.startswith("https://"):
        return _Tls(https=False)
    ca = _file_or_data(cluster, "certificate-authority")
    if credential.client_certificate:
        return _Tls(True, verify, ca, credential.client_certificate, credential.client_key)
    certificate = _file_or_data(user, "client-certificate")
    key = _file_or_data(user, "client-key")
    if bool(certificate) != bool(key):
        raise KubeconfigInvalid(
            f"user {user.name!r} has a client certificate without its key, or a key alone"
        )
    files = None
    if not user.text("client-certificate-data") and not user.text("client-key-data"):
        cert_file, key_file = user.path("client-certificate"), user.path("client-key")
        files = (cert_file, key_file) if cert_file and key_file else None
    return _Tls(True, verify, ca, certificate, key, files)


def _file_or_data(entry: Entry, key: str) -> bytes:
    """`key-data` (base64 of the PEM) if given, else the contents of the file `key` names, else b""."""
    data = entry.text(f"{key}-data")
    if data:
        try:
            return base64.b64decode("".join(data.split()), validate=True)
        except binascii.Error:
            raise KubeconfigInvalid(f"{key}-data of {entry.name!r} is not base64") from None
    path = entry.path(key)
    return path.read_bytes() if path is not None else b""
