"""A Docker Engine behind a proxy that refuses or alters chosen requests: the real engine
answers everything else. For what a real engine will not do on demand (a Swarm API call
refused with a 500, say, or an engine on another architecture)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
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

    async def answer(request: web.Request, session: aiohttp.ClientSession) -> web.Response:
        if seen is not None:
            seen.append((request.method, request.path, dict(request.headers)))
        if request.method == method and pattern.search(request.path):
            return web.json_response({"message": "refused by the test's proxy"}, status=status)
        return await _forward(request, session, request.path_qs)

    async with _serving(engine_socket, answer) as url:
        yield url


@asynccontextmanager
async def altered(
    engine_socket: Path, *, arch: str | None = None, drop_params: frozenset[str] = frozenset()
) -> AsyncIterator[str]:
    """A unix:// engine URL whose engine says it runs on `arch` (in its /version answer),
    and that never hears the query parameters `drop_params` (as an engine that ignores
    them); everything else is the real engine's."""

    async def answer(request: web.Request, session: aiohttp.ClientSession) -> web.Response:
        query = [(k, v) for k, v in request.query.items() if k not in drop_params]
        response = await _forward(request, session, request.path, query)
        if arch is not None and request.path.endswith("/version") and response.body:
            doc = json.loads(bytes(response.body))  # type: ignore[arg-type]
            doc["Arch"] = arch
            response.body = json.dumps(doc).encode()
        return response

    async with _serving(engine_socket, answer) as url:
        yield url


Answer = Callable[[web.Request, aiohttp.ClientSession], Awaitable[web.Response]]


@asynccontextmanager
async def _serving(engine_socket: Path, answer: Answer) -> AsyncIterator[str]:
    session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(engine_socket)))

    async def handle(request: web.Request) -> web.StreamResponse:
        return await answer(request, session)

    app = web.Application(client_max_size=1024**3, handler_args={"auto_decompress": False})
    app.router.add_route("*", "/{tail:.*}", handle)
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


async def _forward(
    request: web.Request,
    session: aiohttp.ClientSession,
    path: str,
    query: list[tuple[str, str]] | None = None,
) -> web.Response:
    async with session.request(
        request.method,
        f"http://docker{path}",
        params=query,
        # the body as it came, compressed or not (the server does not decompress it)
        headers=_kept(request.headers, keep_encoding=True),
        data=io.BytesIO(await request.read()),
    ) as answer:
        body = await answer.read()
        return web.Response(status=answer.status, body=body, headers=_kept(answer.headers))


def _kept(headers: Mapping[str, str], *, keep_encoding: bool = False) -> dict[str, str]:
    """The headers of a message passed on whole: no framing of the hop it came by (and
    no content encoding, for a body that was decoded on the way)."""
    dropped = {"host", "content-length", "transfer-encoding", "connection"}
    if not keep_encoding:
        dropped.add("content-encoding")
    return {k: v for k, v in headers.items() if k.lower() not in dropped}


class Relay:
    """A unix socket that relays every connection to an engine's, byte for byte, until
    `cut()` drops them all at once: an engine gone from the client's side mid-stream,
    while the engine itself runs on."""

    def __init__(self, engine_socket: Path, directory: Path) -> None:
        self.engine_socket = engine_socket
        self.socket = directory / "relay.sock"
        self.url = f"unix://{self.socket}"
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_unix_server(self._relay, path=str(self.socket))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(self.engine_socket))
        self._writers += [writer, up_writer]
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.transport.abort()
