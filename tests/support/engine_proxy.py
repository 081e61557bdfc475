"""A Docker Engine behind a proxy that refuses chosen requests: the real engine answers
everything else. For faults a real engine will not produce on demand (a Swarm API call
refused with a 500, say)."""

from __future__ import annotations

import io
import re
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from aiohttp import web


@asynccontextmanager
async def refusing(
    engine_socket: Path,
    method: str = "",
    path: str = "^$",
    status: int = 500,
    seen: list[tuple[str, str, dict[str, str]]] | None = None,
) -> AsyncIterator[str]:
    """A unix:// engine URL that answers `method` requests whose path matches the
    regular expression `path` with `status`, and forwards every other request whole.
    Each request's method, path and headers go to `seen`, if given."""
    pattern = re.compile(path)
    session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(engine_socket)))

    async def forward(request: web.Request) -> web.StreamResponse:
        if seen is not None:
            seen.append((request.method, request.path, dict(request.headers)))
        if request.method == method and pattern.search(request.path):
            return web.json_response({"message": "refused by the test's proxy"}, status=status)
        async with session.request(
            request.method,
            f"http://docker{request.path_qs}",
            # the body as it came, compressed or not (the server does not decompress it)
            headers=_kept(request.headers, keep_encoding=True),
            data=io.BytesIO(await request.read()),
        ) as answer:
            body = await answer.read()
            return web.Response(status=answer.status, body=body, headers=_kept(answer.headers))

    app = web.Application(client_max_size=1024**3, handler_args={"auto_decompress": False})
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    with tempfile.TemporaryDirectory(prefix="engine-proxy-") as directory:
        socket = Path(directory) / "docker.sock"
        await web.UnixSite(runner, str(socket)).start()
        try:
            yield f"unix://{socket}"
        finally:
            await runner.cleanup()
            await session.close()


def _kept(headers: Mapping[str, str], *, keep_encoding: bool = False) -> dict[str, str]:
    """The headers of a message passed on whole: no framing of the hop it came by (and
    no content encoding, for a body that was decoded on the way)."""
    dropped = {"host", "content-length", "transfer-encoding", "connection"}
    if not keep_encoding:
        dropped.add("content-encoding")
    return {k: v for k, v in headers.items() if k.lower() not in dropped}
