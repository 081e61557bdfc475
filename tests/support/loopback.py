"""A one-route aiohttp server on loopback, for tests that need a real peer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web


async def serving(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], path: str = "/"
) -> AsyncIterator[str]:
    """Serve `handler` at `path` on a free loopback port; yield the server's base URL."""
    app = web.Application()
    app.router.add_route("*", path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
