"""A test client of the leader's API: raw requests, and the few flows tests repeat."""

from __future__ import annotations

import asyncio
import gzip as gzip_module
import io
import json
import ssl
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.canary import CANARY

TIMEOUT = aiohttp.ClientTimeout(total=120)


def tar_of(directory: Path, *, gzip: bool = True) -> bytes:
    """The directory as a tar (gzip with a fixed header time, so equal trees give equal bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for entry in sorted(directory.iterdir()):
            archive.add(entry, arcname=entry.name)
    return gzip_module.compress(buffer.getvalue(), mtime=0) if gzip else buffer.getvalue()


def _issued_secrets(text: str, doc: Any) -> str:
    """Learn a join token or node secret this response hands out, for the final scan; the
    response with it blanked out, since handing it out is the one place it belongs."""
    if isinstance(doc, dict):
        for key in ("token", "secret"):
            if isinstance(doc.get(key), str):
                CANARY.issue(doc[key])
                text = text.replace(doc[key], "<issued>")
    return text


class Api:
    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url
        self.token = token
        self.session = aiohttp.ClientSession(timeout=TIMEOUT)
        self.responses: list[str] = []  # every body seen, for secret scans
        self.last_headers: Mapping[str, str] = {}  # of the last response
        CANARY.responses.append(self.responses)
        self.ssl: ssl.SSLContext | bool = True

    def trust(self, ca_file: Path) -> None:
        """Verify the leader's certificate against its own CA."""
        self.ssl = ssl.create_default_context(cafile=str(ca_file))

    async def close(self) -> None:
        await self.session.close()

    async def drop_connections(self) -> None:
        """Close the pooled keep-alive connections; later requests open new ones."""
        await self.session.close()
        self.session = aiohttp.ClientSession(timeout=TIMEOUT)

    async def request(
        self, method: str, path: str, *, token: str | None = None, **kwargs: Any
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token or self.token}", **kwargs.pop("headers", {})}
        if isinstance(kwargs.get("data"), bytes):
            kwargs["data"] = io.BytesIO(kwargs["data"])
        async with self.session.request(
            method, self.base_url + path, headers=headers, ssl=self.ssl, **kwargs
        ) as response:
            text = await response.text()
            doc = json.loads(text) if text else None
            self.last_headers = response.headers
            self.responses.append(_issued_secrets(text, doc))
            return response.status, doc

    async def deploy_dir_raw(
        self, directory: Path, app: str, headers: Mapping[str, str] | None = None, **params: str
    ) -> tuple[int, Any]:
        return await self.request(
            "POST",
            "/v1/deployments",
            params={"app": app, **params},
            data=tar_of(directory),
            headers={"Content-Type": "application/gzip", **(headers or {})},
        )

    async def deploy_dir(self, directory: Path, app: str, **params: str) -> dict[str, Any]:
        status, doc = await self.deploy_dir_raw(directory, app, None, **params)
        assert status == 202, doc
        return dict(doc)

    async def put_registry(self, server: str, username: str, password: str) -> tuple[int, Any]:
        return await self.request(
            "PUT",
            "/v1/registry",
            json={"server": server, "username": username, "password": password},
        )

    async def events(
        self, dep_id: str, each: Callable[[dict[str, Any]], None] | None = None
    ) -> list[dict[str, Any]]:
        """Follow the event stream until the deployment is final; return every event
        (`each` sees each one as it arrives)."""
        found = []
        async with self.session.get(
            f"{self.base_url}/v1/deployments/{dep_id}/events",
            headers={"Authorization": f"Bearer {self.token}"},
            ssl=self.ssl,
        ) as response:
            assert response.status == 200
            async for line in response.content:
                self.responses.append(line.decode())
                if line.strip():
                    found.append(json.loads(line))
                    if each is not None:
                        each(found[-1])
        return found

    async def first_event(
        self, dep_id: str, match: Callable[[dict[str, Any]], bool], timeout: float = 60
    ) -> dict[str, Any]:
        """Follow the deployment's events until one matches; fail if it ends first."""
        async with (
            asyncio.timeout(timeout),
            self.session.get(
                f"{self.base_url}/v1/deployments/{dep_id}/events",
                headers={"Authorization": f"Bearer {self.token}"},
                ssl=self.ssl,
            ) as response,
        ):
            assert response.status == 200
            async for line in response.content:
                if line.strip() and match(event := json.loads(line)):
                    return dict(event)
        raise AssertionError(f"deployment {dep_id} ended before the event looked for")

    async def wait_log_line(self, dep_id: str, text: str, timeout: float = 60) -> None:
        """Follow the deployment's events until a build log line holds `text`."""
        await self.first_event(dep_id, lambda e: text in str(e.get("line", "")), timeout)

    async def wait_final(self, dep_id: str, timeout: float = 90) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            await self.events(dep_id)
        status, doc = await self.request("GET", f"/v1/deployments/{dep_id}")
        assert status == 200
        return dict(doc)

    async def wait_retention(
        self, dep_id: str, count: int = 1, timeout: float = 30
    ) -> list[dict[str, Any]]:
        """The deployment's `retention` events once `count` are there: old images go
        after the final state, one event per engine (the leader's, a build server's)."""
        async with asyncio.timeout(timeout):
            while True:
                done = [e for e in await self.events(dep_id) if e["type"] == "retention"]
                if len(done) >= count:
                    return done
                await asyncio.sleep(0.05)

    async def wait_state(self, dep_id: str, state: str, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while True:
                _, doc = await self.request("GET", f"/v1/deployments/{dep_id}")
                if doc["state"] == state:
                    return
                await asyncio.sleep(0.1)

    async def join_token(self) -> str:
        status, doc = await self.request("POST", "/v1/join-tokens")
        assert status == 200, doc
        return str(doc["token"])

    async def nodes(self) -> dict[str, dict[str, Any]]:
        status, doc = await self.request("GET", "/v1/nodes")
        assert status == 200, doc
        return {node["name"]: node for node in doc["nodes"]}

    async def wait_nodes(self, timeout: float = 30, **expected: bool) -> dict[str, Any]:
        """Wait until each named node's `connected` is as given; return the node list."""
        async with asyncio.timeout(timeout):
            while True:
                nodes = await self.nodes()
                if all(
                    name in nodes and nodes[name]["connected"] is want
                    for name, want in expected.items()
                ):
                    return nodes
                await asyncio.sleep(0.1)
