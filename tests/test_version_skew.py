"""Mixed versions: workers of the previous release (protocol 1) keep working with this
release's leader, and a worker newer than its leader is refused with what to do.

The previous release is its own wheel (tests/releases/), run as real processes beside
this release's, each worker with its own Docker Engine, against a registry with a login.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import __version__, wire
from tests.support.contexts import busybox_context
from tests.support.dockerd import Dockerd
from tests.support.leader import LeaderProcess
from tests.support.registry import Registry
from tests.support.releases import Installed
from tests.support.worker import WorkerProcess

WorkerFactory = Callable[..., WorkerProcess]
TLS = {"plain_http": None}


def _holds(engine: Dockerd, image: str) -> bool:
    return engine.cli("image", "inspect", image, check=False).returncode == 0


def _events(worker: WorkerProcess) -> list[dict[str, Any]]:
    lines = worker.log_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


async def test_old_and_new_workers_serve_the_same_deployments(
    leader_process: Callable[..., LeaderProcess],
    registry: Registry,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    previous_release: Installed,
    tmp_path: Path,
) -> None:
    """A previous-release worker and a current one enrol, take credentials and their
    rotation, pull the same digest, catch up after being offline, and the old one is
    revoked (exit 3); it never closes the link for a message it cannot read (a Retain
    without the images to hold; no inventory question, so what it holds is unknown)."""
    leader = leader_process(leader=TLS)
    leader.start()
    status, _ = await leader.api.put_registry(registry.host, registry.username, registry.password)
    assert status == 200
    token = await leader.api.join_token()
    old = worker_process(
        "old", worker_engines[0], leader.api.base_url, token, python=previous_release.python
    ).start()
    worker_process("new", worker_engines[1], leader.api.base_url, token).start()
    await leader.api.wait_nodes(old=True, new=True)
    async with asyncio.timeout(10):  # connected first, then its Hello
        nodes = await leader.api.nodes()
        while not all(node["agent_version"] for node in nodes.values()):
            await asyncio.sleep(0.1)
            nodes = await leader.api.nodes()
    assert previous_release.version() == "0.1.0"
    assert (nodes["old"]["agent_version"], nodes["new"]["agent_version"]) == ("0.1.0", __version__)

    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "a"), "skew")
    final = await leader.api.wait_final(dep["id"])
    assert final["state"] == "succeeded", final
    assert {n: r["status"] for n, r in final["nodes"].items()} == {
        "old": "present",
        "new": "present",
    }
    assert all(_holds(engine, final["image"]) for engine in worker_engines)
    _, app = await leader.api.request("GET", "/v1/apps/skew")  # only the new one is asked
    assert app["releases"][0]["retained"]["workers"] == {"old": None, "new": True}

    registry.rotate_password("rotated-password")
    registry.restart()
    status, doc = await leader.api.put_registry(registry.host, registry.username, registry.password)
    assert status == 200
    version = doc["registry"]["version"]
    async with asyncio.timeout(10):
        while {n["credentials_version"] for n in (await leader.api.nodes()).values()} != {version}:
            await asyncio.sleep(0.1)

    old.terminate()
    await leader.api.wait_nodes(old=False)
    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "b"), "skew")
    second = await leader.api.wait_final(dep["id"])
    assert second["state"] == "succeeded", second
    assert second["nodes"]["old"]["status"] == "pending"
    old.start()
    async with asyncio.timeout(30):
        while not _holds(worker_engines[0], second["image"]):
            await asyncio.sleep(0.2)

    old_id = (await leader.api.nodes())["old"]["id"]
    status, _ = await leader.api.request("DELETE", f"/v1/nodes/{old_id}")
    assert status == 200
    assert await asyncio.to_thread(old.wait_exit, 30) == 3
    assert (await leader.api.nodes())["new"]["connected"] is True
    seen = {event.get("event") for event in _events(old)}
    assert "link.bad_message" not in seen, old.log_text()[-2000:]
    assert "link.refused" not in seen, old.log_text()[-2000:]


async def test_a_worker_newer_than_its_leader_exits_4_and_says_to_upgrade_the_leader(
    leader_process: Callable[..., LeaderProcess],
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    previous_release: Installed,
) -> None:
    """This release's worker against a previous-release leader: it exits with status 4
    (the unit does not restart it) and its log says to upgrade the leader first."""
    leader = leader_process(python=previous_release.python, leader=TLS)
    leader.start()
    token = await leader.api.join_token()
    worker = worker_process("ahead", worker_engines[0], leader.api.base_url, token).start()

    assert await asyncio.to_thread(worker.wait_exit, 60) == 4
    refusals = [e for e in _events(worker) if e.get("event") == "agent.leader_too_old"]
    assert refusals, worker.log_text()[-2000:]
    assert "upgrade the leader first" in refusals[0]["error"]


@pytest.mark.parametrize("announced", ["3", "x", "0"])
async def test_the_leader_refuses_a_handshake_it_cannot_speak(
    leader_process: Callable[..., LeaderProcess], announced: str
) -> None:
    """A worker announcing a newer protocol gets 426 with the leader's own version; a
    protocol that is no version gets 400. Both before the node is even looked up."""
    leader = leader_process()
    leader.start()
    headers = {wire.PROTOCOL_HEADER: announced, "Authorization": "Node n-x:secret"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(leader.api.base_url + wire.AGENT_PATH, headers=headers) as response,
    ):
        if announced == "3":
            assert response.status == 426
            assert response.headers[wire.PROTOCOL_HEADER] == str(wire.PROTOCOL_VERSION)
            body = await response.json()
            assert body["error"]["code"] == "leader_too_old"
            assert "upgrade the leader first" in body["error"]["hint"]
        else:
            assert response.status == 400
