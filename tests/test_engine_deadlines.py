"""A pull that makes no progress ends as a transient registry error within the idle
limit, whether the engine stalls before its answer or in the middle of its stream.

The engine here is an HTTP server on a Unix socket that speaks just enough of the Docker
API to stall on purpose; real engines run in the cluster tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from agent import engine as engine_module
from agent.engine import Engine
from agent.errors import RegistryTransientError

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
