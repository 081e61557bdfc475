"""A small client of the leader's API for the command line, with deadlines on every call."""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

from agent.cli.inputs import InputError, first_line
from agent.config import Config
from agent.tls import pinned_context

CALL_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10)
UPLOAD_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_read=600)
FOLLOW_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, hint: str | None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.hint = status, code, message, hint

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}"
        return f"{text}\n  hint: {self.hint}" if self.hint else text


@dataclass(frozen=True)
class Target:
    url: str
    token: str
    ca_file: str | None = None
    ca_from: str = "--ca-file"  # where ca_file was given, for an error about it

    @classmethod
    def resolve(
        cls, url: str | None, token_file: str | None, config: Config | None, ca: str | None
    ) -> Target:
        """URL, token and CA from flags, then the environment, then the leader's config."""
        token = first_line("--token-file", token_file) if token_file else None
        token = token or os.environ.get("DEPLOY_AGENT_TOKEN")
        url = url or os.environ.get("DEPLOY_AGENT_URL")
        ca_from = "--ca-file" if ca else "DEPLOY_AGENT_CA"
        ca = ca or os.environ.get("DEPLOY_AGENT_CA")
        if config is not None and config.leader is not None:
            lc = config.leader
            scheme = "http" if lc.plain_http else "https"
            url = url or f"{scheme}://{_reachable(lc.host)}:{lc.port}"
            token = token or lc.api_token
            if not lc.plain_http and ca is None:
                ca = lc.tls.ca_file if lc.tls else str(config.state_path / "tls" / "ca.pem")
                ca_from = "the leader config's CA"
        if not url or not token:
            raise SystemExit(
                "deploy-agent: say where the leader is: -c CONFIG, or --url and "
                "DEPLOY_AGENT_TOKEN (or --token-file)"
            )
        return cls(url.rstrip("/"), token, ca, ca_from)


def _verifying(ca_file: str, given_as: str) -> ssl.SSLContext:
    """A context that verifies the leader against `ca_file`, named in an error as it
    was given (--ca-file, DEPLOY_AGENT_CA or the leader config)."""
    try:
        return pinned_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InputError(f"{given_as} {ca_file}: {reason}") from None


def _reachable(listen_host: str) -> str:
    """Where this machine reaches a leader listening on `listen_host`: a wildcard by its
    loopback address of the same family (an IPv6 listener takes no IPv4), an IPv6
    address in brackets, as a URL writes it."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen_host, listen_host)  # noqa: S104
    return f"[{host}]" if ":" in host else host


class Client:
    def __init__(self, target: Target) -> None:
        self._target = target
        ssl_ctx = _verifying(target.ca_file, target.ca_from) if target.ca_file else None
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {target.token}"},
            connector=aiohttp.TCPConnector(ssl=ssl_ctx if ssl_ctx else True),
        )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._session.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | list[tuple[str, str]] | None = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        limits: aiohttp.ClientTimeout = CALL_TIMEOUT,
    ) -> Any:
        async with self._session.request(
            method,
            self._target.url + path,
            json=json_body,
            params=params,
            data=data,
            headers=headers,
            timeout=limits,
            allow_redirects=False,
        ) as response:
            _refuse_redirect(response)
            doc = _decoded(response.status, await response.read())
            if response.status >= 400:
                raise _api_error(response.status, doc)
            return doc

    async def events(self, dep_id: str, kind: str = "deployments") -> AsyncIterator[dict[str, Any]]:
        """The event stream of a deployment (or, with `kind`, of an upgrade)."""
        url = f"{self._target.url}/v1/{kind}/{dep_id}/events"
        async with self._session.get(
            url, timeout=FOLLOW_TIMEOUT, allow_redirects=False
        ) as response:
            _refuse_redirect(response)
            if response.status >= 400:
                raise _api_error(response.status, _decoded(response.status, await response.read()))
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)


def _refuse_redirect(response: aiohttp.ClientResponse) -> None:
    """The leader never redirects: one that does is not the leader's own URL (a proxy,
    an ingress), and following it would carry the API token elsewhere."""
    if 300 <= response.status < 400:
        to = response.headers.get("Location", "elsewhere")
        raise ApiError(
            response.status,
            str(response.status),
            f"{response.url} redirects to {to}",
            "give the leader's own URL (--url, DEPLOY_AGENT_URL or the config's listen)",
        )


def describe(exc: BaseException) -> str:
    """An exception for a person to read: its type and message. Not its repr: a client
    error's repr can hold the request's headers, the API token among them."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _decoded(status: int, body: bytes) -> Any:
    """The JSON body; a body that is not JSON (a proxy's error page) is an ApiError that
    shows its start."""
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        text = " ".join(body.decode(errors="replace").split())[:200]
        raise ApiError(status, str(status), f"the answer is not JSON: {text}", None) from None


def _api_error(status: int, doc: Any) -> ApiError:
    error = doc.get("error", {}) if isinstance(doc, dict) else {}
    return ApiError(
        status,
        error.get("code", str(status)),
        error.get("message", "request failed"),
        error.get("hint"),
    )
