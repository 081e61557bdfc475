"""A real git server over HTTP on loopback: git's own http-backend behind Basic auth, for
tests of git sources that need credentials."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from tests.support.loopback import serving

BACKEND_DEADLINE_S = 30.0


class GitHttp:
    """Serves the repositories under `root` to a client that authenticates as
    `username`:`password`; anyone else gets a 401 that asks for credentials."""

    def __init__(self, root: Path, username: str, password: str) -> None:
        self.root = root
        self._expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self.refused = 0
        self.served = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != self._expected:
            self.refused += 1
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="git"'})
        self.served += 1
        return await self._backend(request)

    async def _backend(self, request: web.Request) -> web.Response:
        """Run `git http-backend` as the CGI program it is (aiohttp has already undone a
        gzip Content-Encoding of the body)."""
        env = {
            "PATH": "/usr/bin:/bin",
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": request.method,
            "PATH_INFO": request.path,
            "QUERY_STRING": request.query_string,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "REMOTE_USER": "test",
            "REMOTE_ADDR": "127.0.0.1",
        }
        proc = await asyncio.create_subprocess_exec(
            "git",
            "http-backend",
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        body = await request.read()
        out, err = await asyncio.wait_for(proc.communicate(body), BACKEND_DEADLINE_S)
        if proc.returncode != 0:
            raise RuntimeError(f"git http-backend failed: {err.decode(errors='replace')[-500:]}")
        head, payload = _split_cgi(out)
        status, headers = 200, {}
        for line in head.decode().splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            else:
                headers[name] = value.strip()
        return web.Response(status=status, body=payload, headers=headers)


def _split_cgi(out: bytes) -> tuple[bytes, bytes]:
    """A CGI program's output: its header lines, then a blank line, then the body."""
    ends = [(out.find(sep), sep) for sep in (b"\r\n\r\n", b"\n\n") if sep in out]
    if not ends:
        raise RuntimeError(f"git http-backend wrote no header: {out[:200]!r}")
    at, sep = min(ends)
    return out[:at], out[at + len(sep) :]


async def git_http(root: Path, username: str, password: str) -> AsyncIterator[tuple[str, GitHttp]]:
    """Serve `root` on a free loopback port; yield the base URL and the server."""
    server = GitHttp(root, username, password)
    async for url in serving(server.handle, "/{tail:.*}"):
        yield url, server
