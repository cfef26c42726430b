"""Credentials that a kubeconfig user gets from elsewhere: an exec plugin, or an OIDC identity provider.

Both give tokens that expire (an EKS token after 15 minutes, an OIDC id-token when its `exp` passes), so
each credential says when it must be fetched again; the client fetches it again then, or sooner after a
401 (app/kube/client.py). Messages never carry a token: a plugin's or provider's error is reduced to its
exit code or status and one line of its own explanation.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import orjson

from app.kube.kubeconfig import Entry, KubeconfigInvalid

EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
EXEC_TIMEOUT = 60.0  # a plugin that hangs must not hang every later reload with it
OIDC_TIMEOUT = 30.0
# An OIDC id-token is renewed this long before its `exp`, so that it does not expire in flight (client-go
# uses the same margin).
OIDC_EXPIRY_MARGIN = 10.0


class CredentialError(ValueError):
    """A plugin or provider did not give usable credentials; str() is one line, without any secret."""


@dataclass(frozen=True)
class Credential:
    """What a plugin gave: a bearer token and/or a client certificate (PEM), and when to fetch it again."""

    token: str = field(default="", repr=False)
    client_certificate: bytes = field(default=b"", repr=False)
    client_key: bytes = field(default=b"", repr=False)
    expires_at: float | None = None  # time.time(); None: until the API server refuses it


# exec plugins (client.authentication.k8s.io ExecCredential)


async def exec_credential(user: Entry, cluster: Entry) -> Credential:
    """Runs the user's exec plugin as kubectl does and returns the credential it printed."""
    spec = user.fields["exec"]
    if not isinstance(spec, dict):
        raise KubeconfigInvalid(f"exec of user {user.name!r} must be a mapping")
    api_version = spec.get("apiVersion")
    if api_version not in EXEC_API_VERSIONS:
        versions = ", ".join(EXEC_API_VERSIONS)
        raise KubeconfigInvalid(
            f"exec apiVersion {api_version!r} of user {user.name!r} is not one of {versions}"
        )
    if spec.get("interactiveMode") == "Always":
        raise KubeconfigInvalid(
            f"the exec plugin of user {user.name!r} needs a terminal (interactiveMode Always)"
        )
    command = _plugin_command(user)
    args = spec.get("args") or []
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise KubeconfigInvalid(f"exec args of user {user.name!r} must be a list of strings")
    env = dict(os.environ)
    for item in spec.get("env") or []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise KubeconfigInvalid(f"exec env of user {user.name!r} must be a list of name/value pairs")
        env[item["name"]] = str(item.get("value", ""))
    exec_spec: dict[str, Any] = {"interactive": False}
    if spec.get("provideClusterInfo"):
        exec_spec["cluster"] = _cluster_info(cluster)
    request = {"apiVersion": api_version, "kind": "ExecCredential", "spec": exec_spec}
    env["KUBERNETES_EXEC_INFO"] = orjson.dumps(request).decode()
    stdout = await _run_plugin(command, args, env, str(spec.get("installHint") or ""))
    return _exec_result(command, api_version, stdout)


def _plugin_command(user: Entry) -> str:
    """The command, resolved against the kubeconfig's directory when it is a relative path (as kubectl
    does); a bare name is looked up on PATH."""
    command = user.fields["exec"].get("command")
    if not isinstance(command, str) or not command:
        raise KubeconfigInvalid(f"exec of user {user.name!r} has no command")
    if os.sep in command and not os.path.isabs(command):
        return str(user.base / command)
    return command


def _cluster_info(cluster: Entry) -> dict[str, Any]:
    """The cluster as an ExecCredential's spec.cluster (for plugins that set provideClusterInfo)."""
    info: dict[str, Any] = {"server": cluster.text("server")}
    ca = cluster.text("certificate-authority-data")
    if not ca and (ca_file := cluster.path("certificate-authority")) is not None:
        ca = base64.b64encode(ca_file.read_bytes()).decode()
    optional = {
        "certificate-authority-data": ca,
        "tls-server-name": cluster.text("tls-server-name"),
        "proxy-url": cluster.text("proxy-url"),
        "insecure-skip-tls-verify": bool(cluster.fields.get("insecure-skip-tls-verify")),
        "disable-compression": bool(cluster.fields.get("disable-compression")),
    }
    info.update({key: value for key, value in optional.items() if value})
    for extension in cluster.fields.get("extensions") or []:
        if isinstance(extension, dict) and extension.get("name") == "client.authentication.k8s.io/exec":
            info["config"] = extension.get("extension")
    return info


async def _run_plugin(command: str, args: list[str], env: dict[str, str], install_hint: str) -> bytes:
    name = os.path.basename(command)
    try:
        process = await asyncio.create_subprocess_exec(
            command,
            *args,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:  # not found, not executable
        hint = f"; {_first_line(install_hint)}" if install_hint.strip() else ""
        raise CredentialError(f"cannot run the exec plugin {command}: {exc.strerror or exc}{hint}") from None
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), EXEC_TIMEOUT)
    except TimeoutError:
        raise CredentialError(f"the exec plugin {name} did not answer within {EXEC_TIMEOUT:g} s") from None
    finally:
        if process.returncode is None:  # timed out, or kopa is shutting down: no plugin left behind
            process.kill()
    if process.returncode != 0:
        said = _last_line(stderr.decode("utf-8", "replace"))
        raise CredentialError(
            f"the exec plugin {name} exited with {process.returncode}" + (f": {said}" if said else "")
        )
    return stdout


def _exec_result(command: str, api_version: str, stdout: bytes) -> Credential:
    name = os.path.basename(command)
    try:
        doc = orjson.loads(stdout)
    except orjson.JSONDecodeError:
        raise CredentialError(f"the exec plugin {name} did not print an ExecCredential (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("kind") != "ExecCredential":
        raise CredentialError(f"the exec plugin {name} did not print an ExecCredential")
    if doc.get("apiVersion") != api_version:
        raise CredentialError(
            f"the exec plugin {name} answered in {doc.get('apiVersion')!r}, not the {api_version!r} asked for"
        )
    status = doc.get("status")
    if not isinstance(status, dict):
        raise CredentialError(f"the exec plugin {name} printed an ExecCredential without a status")
    token = status.get("token") or ""
    certificate, key = status.get("clientCertificateData") or "", status.get("clientKeyData") or ""
    if not all(isinstance(value, str) for value in (token, certificate, key)):
        raise CredentialError(f"the exec plugin {name} printed a status whose fields are not strings")
    if bool(certificate) != bool(key):
        raise CredentialError(
            f"the exec plugin {name} printed a client certificate without its key, or a key alone"
        )
    if not token and not certificate:
        raise CredentialError(f"the exec plugin {name} printed neither a token nor a client certificate")
    expiry = status.get("expirationTimestamp")
    return Credential(
        token=token,
        client_certificate=certificate.encode(),
        client_key=key.encode(),
        expires_at=_rfc3339(expiry, name) if expiry else None,
    )


def _rfc3339(value: object, name: str) -> float:
    """A Kubernetes timestamp as time.time() seconds; fractions beyond microseconds are dropped."""
    text = str(value)
    head, dot, rest = text.partition(".")
    if dot:  # Go writes up to nine digits of fraction; Python reads six
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise CredentialError(
            f"the exec plugin {name} printed an expirationTimestamp that is not RFC 3339"
        ) from None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:300]


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")[:300]


# OIDC (the `oidc` auth-provider)

# The newest (id-token, refresh-token) pair kopa got for each refresh token the kubeconfig holds. kubectl
# writes a refreshed pair back into the kubeconfig; kopa does not (it is usually a read-only mount), so it
# remembers it for the life of the process instead: identity providers that rotate refresh tokens accept
# each one only once, and the kubeconfig's would be refused at the next reload.
_refreshed: dict[tuple[str, str, str], tuple[str, str]] = {}


async def oidc_credential(user: Entry) -> Credential:
    """The id-token of the user's `oidc` auth-provider, refreshed at its identity provider when expired."""
    config = user.fields["auth-provider"].get("config")
    if not isinstance(config, dict):
        raise KubeconfigInvalid(f"the oidc auth-provider of user {user.name!r} has no config")
    provider = Entry(user.name, config, user.base)
    issuer, client_id = provider.text("idp-issuer-url"), provider.text("client-id")
    key = (issuer, client_id, provider.text("refresh-token"))
    id_token, refresh_token = _refreshed.get(key, (provider.text("id-token"), provider.text("refresh-token")))
    if id_token:
        expires_at = _jwt_expiry(id_token)
        if expires_at is None or time.time() < expires_at - OIDC_EXPIRY_MARGIN:
            return Credential(
                token=id_token, expires_at=None if expires_at is None else expires_at - OIDC_EXPIRY_MARGIN
            )
    if not refresh_token:
        what = "has expired" if id_token else "is missing"
        raise CredentialError(
            f"the oidc id-token of user {user.name!r} {what}, and there is no refresh-token"
        )
    if not issuer or not client_id:
        raise KubeconfigInvalid(
            f"the oidc auth-provider of user {user.name!r} needs idp-issuer-url and client-id"
        )
    id_token, new_refresh = await _refresh(provider, issuer, client_id, refresh_token)
    _refreshed[key] = (id_token, new_refresh or refresh_token)
    expires_at = _jwt_expiry(id_token)
    return Credential(
        token=id_token, expires_at=None if expires_at is None else expires_at - OIDC_EXPIRY_MARGIN
    )


def _jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT (its signature is the API server's business), or None if it has none."""
    parts = token.split(".")
    if len(parts) != 3:
        raise CredentialError("the oidc id-token is not a JWT")
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        raise CredentialError("the oidc id-token is not a JWT") from None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) else None


async def _refresh(provider: Entry, issuer: str, client_id: str, refresh_token: str) -> tuple[str, str]:
    """A refresh-token grant at the token endpoint the issuer's discovery document names."""
    ca = provider.text("idp-certificate-authority-data")
    ca_file = provider.path("idp-certificate-authority")
    context: ssl.SSLContext | bool = True
    if ca or ca_file:
        pem = base64.b64decode(ca).decode() if ca else None
        context = ssl.create_default_context(cafile=None if pem else ca_file, cadata=pem)
    secret = provider.text("client-secret")
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    # Client authentication as RFC 6749 prefers it: HTTP Basic for a confidential client, the client_id in
    # the form for a public one.
    headers = {"Authorization": aiohttp.encode_basic_auth(client_id, secret)} if secret else {}
    if not secret:
        form["client_id"] = client_id
    try:
        async with aiohttp.ClientSession(
            headers={"Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=OIDC_TIMEOUT),
            trust_env=True,  # the identity provider is reached as kubectl would, through HTTPS_PROXY
        ) as session:
            discovery = await _oidc_json(
                session, "GET", f"{issuer.rstrip('/')}/.well-known/openid-configuration", context
            )
            endpoint = discovery.get("token_endpoint")
            if not isinstance(endpoint, str) or not endpoint:
                raise CredentialError(f"the oidc issuer {issuer} names no token_endpoint")
            answer = await _oidc_json(session, "POST", endpoint, context, data=form, headers=headers)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise CredentialError(f"cannot refresh the oidc id-token at {issuer}: {type(exc).__name__}") from None
    id_token, new_refresh = answer.get("id_token"), answer.get("refresh_token") or ""
    if not isinstance(id_token, str) or not id_token or not isinstance(new_refresh, str):
        raise CredentialError(f"the oidc issuer {issuer} answered the refresh without an id_token")
    return id_token, new_refresh


async def _oidc_json(
    session: aiohttp.ClientSession, method: str, url: str, context: ssl.SSLContext | bool, **kwargs: Any
) -> dict[str, Any]:
    async with session.request(method, url, ssl=context, **kwargs) as resp:
        body = await resp.read()
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if resp.status != 200 or not isinstance(doc, dict):
        # OAuth's error code (invalid_grant, ...) explains a refusal and is never a secret.
        reason = doc.get("error") if isinstance(doc, dict) and isinstance(doc.get("error"), str) else ""
        raise CredentialError(
            f"the oidc issuer answered {method} {url} with HTTP {resp.status} {reason}".rstrip()
        )
    return doc
