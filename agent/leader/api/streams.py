"""Event streams as the API serves them: NDJSON, one event a line, written as it comes."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web


async def ndjson(request: web.Request, docs: AsyncIterator[bytes]) -> web.StreamResponse:
    """Stream `docs` (each an encoded JSON object; b"" keeps the connection alive)."""
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    async for doc in docs:
        await response.write(doc + b"\n")
    await response.write_eof()
    return response
