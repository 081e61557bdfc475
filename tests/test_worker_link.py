"""The worker's side of the link, against a real websocket server on loopback: how fast it
knocks again after a leader closed the link, and what it sends back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from agent import wire
from agent.config import parse_config
from agent.worker.agent import Worker
from agent.worker.identity import Identity
from tests.support.loopback import serving


class ClosingLeader:
    """Accepts each link, waits for the worker's hello, then closes it with `code`."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.links = 0

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.links += 1
        await ws.receive(timeout=5)
        await ws.close(code=self.code)
        return ws


def _worker(tmp_path: Path, url: str) -> Worker:
    config = parse_config(
        {
            "role": "worker",
            "state_dir": str(tmp_path),
            "engine": {"url": f"unix://{tmp_path}/no-engine.sock"},
            "worker": {"leader_url": url},
        }
    )
    return Worker(config)


async def _links_within(
    code: int, tmp_path: Path, seconds: float, enrolled_with: str | None = None
) -> int:
    """How many links the worker opens in `seconds` to a leader that closes each with
    `code`; the worker enrolled with the leader at `enrolled_with` (default: the same)."""
    leader = ClosingLeader(code)
    async for url in serving(leader.handler, wire.AGENT_PATH):
        worker = _worker(tmp_path, url)
        identity = Identity(node_id="n-1", secret="s", leader_url=enrolled_with or url, ca_pem=None)
        stop = asyncio.Event()
        loop = asyncio.create_task(worker._link_loop(identity, stop))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.wait_for(loop, 5)
        await worker.engine.close()
    return leader.links


@pytest.mark.parametrize("code", [wire.CLOSE_REPLACED, wire.CLOSE_BAD_MESSAGE])
async def test_a_link_closed_as_futile_waits_at_the_backoff_cap(code: int, tmp_path: Path) -> None:
    """Replaced by another agent with this identity, or messages neither side can read:
    the next try waits 15 to 30 s, not the half second of a fresh backoff."""
    assert await _links_within(code, tmp_path, 3.0) == 1


async def test_a_link_closed_at_once_does_not_start_the_backoff_over(tmp_path: Path) -> None:
    """A leader that accepts each link and closes it at once gets tries at a doubling
    delay (0.25-0.5 s, 0.5-1 s, 1-2 s...), not one every half second."""
    assert 2 <= await _links_within(wire.CLOSE_SHUTDOWN, tmp_path, 2.5) <= 4


async def test_the_worker_follows_the_leader_url_of_its_config(tmp_path: Path) -> None:
    """Enrolled with a leader that has since moved: the config's URL is the one used."""
    gone = "http://127.0.0.1:9"  # discard port: nothing listens
    assert await _links_within(wire.CLOSE_SHUTDOWN, tmp_path, 1.0, enrolled_with=gone) >= 1
