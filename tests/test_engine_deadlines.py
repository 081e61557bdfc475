"""A pull that makes no progress ends as a transient registry error within the idle
limit, whether the engine stalls before its answer or in the middle of its stream; a
build the engine fails before reading its whole context, or one given up while its
context is uploading, leaves no connection behind.

The engines here are servers on a Unix socket that speak just enough of the Docker API
to misbehave on purpose; real engines run in the cluster tests.
"""

from __future__ import annotations

import asyncio
import os
import select
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from agent import engine as engine_module
from agent.buildlog import BuildEvent
from agent.engine import BuildSpec, Engine
from agent.errors import BuildError, RegistryTransientError

IDLE = 0.5
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IMAGE = "registry.test/acme/web@sha256:" + "a" * 64


async def _version(request: web.Request) -> web.Response:
    return web.json_response({"ApiVersion": "1.43", "Version": "stalling"})


async def _silent(request: web.Request) -> web.StreamResponse:
    """Reads the request and never answers."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def _one_line_then_silent(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    await response.write(b'{"status": "Pulling from acme/web", "id": "' + b"a" * 12 + b'"}\n')
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def _stalling_engine(tmp_path: Path, create: Handler) -> AsyncIterator[Engine]:
    app = web.Application()
    app.router.add_get("/version", _version)
    app.router.add_get("/v1.43/version", _version)
    app.router.add_post("/v1.43/images/create", create)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    sock = tmp_path / "engine.sock"
    await web.UnixSite(runner, str(sock)).start()
    engine = Engine(f"unix://{sock}", timeout=5)
    try:
        yield engine
    finally:
        await engine.close()
        await runner.cleanup()


async def _no_op(progress: object) -> None:
    return None


@pytest.mark.parametrize(
    "create", [_silent, _one_line_then_silent], ids=["before-the-answer", "mid-stream"]
)
async def test_a_stalled_pull_fails_within_the_idle_limit(
    create: Handler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "PUSH_IDLE_SECONDS", IDLE)
    async for engine in _stalling_engine(tmp_path, create):
        started = time.monotonic()
        with pytest.raises(RegistryTransientError, match="made no progress"):
            async with asyncio.timeout(10):  # the test's own bound: the bug is a hang
                await engine.pull(IMAGE, None, _no_op)
        assert time.monotonic() - started < IDLE + 2


CONTEXT_BYTES = 16 * 1024 * 1024  # far more than the socket buffers hold


async def _until_the_build(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer version queries; return once the request line and headers of another
    request (the build) have been read, and nothing of its body."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"/version" not in head.split(b"\r\n", 1)[0]:
            return
        body = b'{"ApiVersion": "1.43", "Version": "misbehaving"}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


async def _fails_the_build_unread(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer_gone: asyncio.Future[bool]
) -> None:
    """Answer the version query; answer a build with an error at once, read nothing
    more, and report whether the client's end of the socket closes."""
    await _until_the_build(reader, writer)
    line = b'{"errorDetail": {"message": "no space left"}, "error": "no space left"}\n'
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
    writer.write(b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(line), line))
    try:
        peer_gone.set_result(await _closes_within(writer, 3.0))
    finally:
        writer.close()


async def _closes_within(writer: asyncio.StreamWriter, seconds: float) -> bool:
    """Whether the peer closes its end within `seconds`, reading nothing it sent."""
    poller = select.poll()
    poller.register(writer.get_extra_info("socket").fileno(), select.POLLRDHUP)
    deadline = time.monotonic() + seconds
    while not poller.poll(0):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_a_build_failed_mid_upload_cuts_its_connection(tmp_path: Path) -> None:
    """The engine fails the build while 16 MiB of context are still on their way and
    reads no more of it: the agent's end of the socket closes at once all the same, with
    the unsent rest dropped (a plain close would wait to send it, for ever)."""
    context = tmp_path / "context.tar"
    context.write_bytes(os.urandom(CONTEXT_BYTES))
    peer_gone: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    sock = tmp_path / "engine.sock"
    server = await asyncio.start_unix_server(
        lambda r, w: _fails_the_build_unread(r, w, peer_gone), str(sock)
    )
    engine = Engine(f"unix://{sock}", timeout=5)
    try:
        with pytest.raises(BuildError, match="no space left"):
            async with asyncio.timeout(10):
                await _build(engine, context)
        assert await asyncio.wait_for(peer_gone, 10), "the connection stayed open"
    finally:
        await engine.close()
        server.close()
        await server.wait_closed()


async def _build(engine: Engine, context: Path) -> str:
    return await engine.build(context, BuildSpec(tag="t"), _no_op_event)


async def _no_op_event(event: BuildEvent) -> None:
    return None


async def _stops_reading_the_build(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    started: asyncio.Event,
    peer_gone: asyncio.Future[bool],
) -> None:
    """Answer the version query; take a build's request line and headers, then read
    nothing more and answer nothing (an engine stalled mid-upload), and report whether
    the client's end of the socket closes within 3 s of that."""
    await _until_the_build(reader, writer)
    started.set()
    try:
        peer_gone.set_result(await _closes_within(writer, 3.0))
    finally:
        writer.close()


async def test_a_build_cancelled_mid_upload_cuts_its_connection(tmp_path: Path) -> None:
    """A build given up while its context is still uploading (a cancel, a stage's
    deadline, a stop), to an engine that reads no more of it: the agent's end of the
    socket closes at once, the unsent rest dropped. A plain close waits to send that
    rest first, and the socket stays open, closing, for as long as the engine does
    not read."""
    context = tmp_path / "context.tar"
    context.write_bytes(os.urandom(CONTEXT_BYTES))
    started = asyncio.Event()
    peer_gone: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    sock = tmp_path / "engine.sock"
    server = await asyncio.start_unix_server(
        lambda r, w: _stops_reading_the_build(r, w, started, peer_gone), str(sock)
    )
    engine = Engine(f"unix://{sock}", timeout=5)
    try:
        build = asyncio.create_task(_build(engine, context))
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(0.2)  # the upload fills the socket and waits for the engine
        build.cancel()
        with pytest.raises(asyncio.CancelledError):
            await build
        assert await asyncio.wait_for(peer_gone, 10), "the connection stayed open"
    finally:
        await engine.close()
        server.close()
        await server.wait_closed()
