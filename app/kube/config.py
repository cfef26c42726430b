"""Where the Kubernetes API is and how to authenticate: kubeconfig, KUBECONFIG, or the pod's ServiceAccount.

The official client's loaders do the parsing (contexts, exec plugins, embedded certificates); kopa only keeps
the few values it needs to open its own aiohttp session, and can load them again when credentials rotate.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiohttp
from kubernetes.aio import config as kube_config
from kubernetes.aio.client import Configuration

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# aiohttp speaks to HTTP proxies (CONNECT for https:// API servers) and to HTTPS proxies (TLS to the proxy,
# then TLS inside). SOCKS would need another dependency.
PROXY_SCHEMES = ("http", "https")


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


def _ssl_context(cfg: Configuration) -> ssl.SSLContext | bool:
    if not cfg.host.startswith("https"):
        return False
    if not cfg.verify_ssl:
        return False
    context = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
    if cfg.cert_file and cfg.key_file:
        context.load_cert_chain(cfg.cert_file, cfg.key_file)
    return context


def _tls_fingerprint(cfg: Configuration) -> str:
    """Digest of the inputs of _ssl_context: the same files' contents give the same digest."""
    digest = hashlib.sha256()
    digest.update(f"{cfg.host.startswith('https')}|{bool(cfg.verify_ssl)}".encode())
    for name in (cfg.ssl_ca_cert, cfg.cert_file, cfg.key_file):
        digest.update(b"|")
        if name:
            digest.update(Path(name).read_bytes())
    return digest.hexdigest()


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
        authorization = aiohttp.BasicAuth(user, password).encode()
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    netloc = f"{host}:{port}" if port is not None else host
    return parsed._replace(netloc=netloc).geturl(), authorization


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (SERVICE_ACCOUNT_DIR / "token").exists()


async def load_connection(kubeconfig: str, environ: dict[str, str] | None = None) -> KubeConnection:
    """Finds the API server as kubectl does: --kubeconfig, KUBECONFIG, in-cluster, then ~/.kube/config."""
    env = dict(os.environ if environ is None else environ)
    path = kubeconfig or env.get("KUBECONFIG", "")
    cfg = Configuration()
    try:
        if not path and _in_cluster():
            kube_config.load_incluster_config(client_configuration=cfg)
            namespace_file = SERVICE_ACCOUNT_DIR / "namespace"
            namespace = namespace_file.read_text().strip() if namespace_file.exists() else "default"
            source = "in-cluster service account"
        else:
            path = path or str(Path.home() / ".kube" / "config")
            if not Path(path.split(os.pathsep)[0]).is_file():  # noqa: ASYNC240 - once, at start-up
                raise KubeConfigError(f"cannot load the kubeconfig {path}: no such file")
            await kube_config.load_kube_config(
                config_file=path, client_configuration=cfg, persist_config=False
            )
            _, active = kube_config.list_kube_config_contexts(config_file=path)
            namespace = (active or {}).get("context", {}).get("namespace") or "default"
            source = path
        authorization = await cfg.get_api_key_with_prefix("BearerToken")
        proxy, proxy_authorization = _proxy(cfg.proxy)
        return KubeConnection(
            host=cfg.host.rstrip("/"),
            authorization=authorization,
            ssl_context=_ssl_context(cfg),
            namespace=namespace,
            source=source,
            tls_fingerprint=_tls_fingerprint(cfg),
            server_name=cfg.tls_server_name or None,
            proxy=proxy,
            proxy_authorization=proxy_authorization,
        )
    except (kube_config.ConfigException, OSError, ssl.SSLError, KeyError, TypeError, ValueError) as exc:
        where = path or "in-cluster configuration"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KubeConfigError(f"cannot load Kubernetes connection from {where}: {detail}") from exc
