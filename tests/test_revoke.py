"""Revocation over a real link: the worker learns of it from the close code itself.

A real leader process serving TLS and the worker's own link loop: a node
revoked while idle must get the 4403 close frame before the connection ends, so that it
stops at once (exit status 3) and never knocks again.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent import wire
from agent.tls import new_secret
from agent.worker.agent import NodeRevoked, Worker
from agent.worker.identity import enrol
from tests.support.leader import LeaderProcess, leader_config
from tests.test_worker_link import _worker as worker_of

REVOCATIONS = 10


def _worker(tmp_path: Path, url: str) -> Worker:
    worker = worker_of(tmp_path, url)
    worker._back_on_leader = asyncio.Event()  # what run() sets up before the link loop
    return worker


async def _revoke_idle_node(
    leader: LeaderProcess, tmp_path: Path, index: int
) -> list[dict[str, Any]]:
    """Enrol a node, link it, revoke it once idle; the worker's link log events."""
    url = leader.api.base_url
    identity = await enrol(url, await leader.api.join_token(), f"w{index}", new_secret())
    worker = _worker(tmp_path / f"w{index}", url)
    stop = asyncio.Event()
    with capture_logs() as logs:
        loop = asyncio.create_task(worker._link_loop(identity, stop))
        try:
            await leader.api.wait_nodes(**{f"w{index}": True})
            await asyncio.sleep(0.2)  # idle: its hello and sync are through
            status, _ = await leader.api.request("DELETE", f"/v1/nodes/{identity.node_id}")
            assert status == 200
            with pytest.raises(NodeRevoked):
                await asyncio.wait_for(loop, 10)
        finally:
            stop.set()
            await asyncio.gather(loop, return_exceptions=True)
            await worker.engine.close()
    return [dict(e) for e in logs if str(e["event"]).startswith("link.")]


async def test_an_idle_revoked_worker_gets_4403_and_stops_without_knocking_again(
    tmp_path: Path,
) -> None:
    """Ten idle revocations in a row: each worker's link ends with close code 4403 (not
    1006, a connection lost), and its link loop ends with NodeRevoked, the exit status 3
    path, without a reconnect attempt."""
    raw = leader_config(tmp_path / "state", "unix:///nonexistent/docker.sock")
    raw["leader"].pop("plain_http")
    leader = LeaderProcess(raw, tmp_path)
    await asyncio.to_thread(leader.start)
    try:
        outcomes = [await _revoke_idle_node(leader, tmp_path, i) for i in range(REVOCATIONS)]
    finally:
        await asyncio.to_thread(leader.terminate)
        await leader.api.close()
    codes = [[e.get("code") for e in events if e["event"] == "link.closed"] for events in outcomes]
    assert codes == [[wire.CLOSE_REVOKED]] * REVOCATIONS, outcomes
    knocked = [events for events in outcomes if any(e["event"] == "link.reconnect" for e in events)]
    assert knocked == []
