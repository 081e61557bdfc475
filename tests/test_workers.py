"""Workers: enrolment over TLS, the link, live credentials, pulls by digest, catch-up.

A leader, worker agents as real processes, each worker with its own Docker Engine,
and a registry with a login.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.tls import new_secret
from agent.worker.identity import PROPOSAL_FILE, proposed_secret
from tests.support.canary import CANARY as CANARY_VALUES
from tests.support.cluster import start_cluster as _cluster
from tests.support.contexts import busybox_context
from tests.support.dockerd import Dockerd
from tests.support.leader import InProcessLeader, LeaderProcess
from tests.support.registry import Registry
from tests.support.worker import WorkerProcess

WorkerFactory = Callable[..., WorkerProcess]
TLS = {"plain_http": None}


def _holds(engine: Dockerd, image: str) -> bool:
    return engine.cli("image", "inspect", image, check=False).returncode == 0


async def test_both_workers_hold_the_digest_after_a_deployment(
    leader_process: Callable[..., LeaderProcess],
    registry: Registry,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    tmp_path: Path,
) -> None:
    """Leader and two workers as processes over TLS: each worker's engine holds the digest."""
    leader = leader_process(leader=TLS)
    leader.start()
    await _cluster(leader, registry, worker_engines, worker_process)

    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "spread")
    final = await leader.api.wait_final(dep["id"])

    assert final["state"] == "succeeded", final
    assert {n: r["status"] for n, r in final["nodes"].items()} == {"w1": "present", "w2": "present"}
    for engine in worker_engines:
        assert _holds(engine, final["image"])
    nodes = await leader.api.nodes()
    assert all(n["last_pull"]["image"] == final["image"] for n in nodes.values())
    assert all(n["engine_version"] and n["arch"] for n in nodes.values())


async def test_credential_rotation_reaches_every_worker(
    leader_factory: Callable[..., Any],
    registry: Registry,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    tmp_path: Path,
) -> None:
    """A new password, once set, is acknowledged by both workers within 5 s and pulls work."""
    leader = await leader_factory(leader=TLS)
    await _cluster(leader, registry, worker_engines, worker_process)
    registry.rotate_password("rotated-password")
    registry.restart()

    status, doc = await leader.api.put_registry(registry.host, registry.username, registry.password)
    assert status == 200
    version = doc["registry"]["version"]
    async with asyncio.timeout(5):
        while {n["credentials_version"] for n in (await leader.api.nodes()).values()} != {version}:
            await asyncio.sleep(0.1)

    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "rotated")
    final = await leader.api.wait_final(dep["id"])
    assert final["state"] == "succeeded", final
    metrics = await _metrics(leader)
    for node in ("w1", "w2"):
        assert f'deploy_agent_node_credentials_version{{node="{node}"}} {version}.0' in metrics
        assert re.search(rf'deploy_agent_node_last_pull_seconds{{node="{node}"}} \d', metrics)
    assert "deploy_agent_pull_duration_seconds_count 2.0" in metrics
    assert "deploy_agent_workers_connected 2.0" in metrics


async def _metrics(leader: InProcessLeader) -> str:
    async with leader.api.session.get(
        leader.api.base_url + "/metrics",
        headers={"Authorization": f"Bearer {leader.api.token}"},
        ssl=leader.api.ssl,
    ) as response:
        return await response.text()


async def test_offline_worker_is_pending_and_catches_up_on_reconnect(
    leader_factory: Callable[..., Any],
    registry: Registry,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    tmp_path: Path,
) -> None:
    """A worker stopped during a deployment is pending; restarted, it pulls the image itself
    and the deployment then records it present."""
    leader = await leader_factory(leader=TLS)
    _, w2 = await _cluster(leader, registry, worker_engines, worker_process)
    w2.terminate()
    await leader.api.wait_nodes(w2=False)

    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "catchup")
    final = await leader.api.wait_final(dep["id"])

    assert final["state"] == "succeeded", final
    assert final["nodes"]["w2"]["status"] == "pending"
    assert not _holds(worker_engines[1], final["image"])
    w2.start()
    async with asyncio.timeout(30):
        while not _holds(worker_engines[1], final["image"]):
            await asyncio.sleep(0.2)
    nodes = await leader.api.wait_nodes(w2=True)
    assert nodes["w2"]["connected"]
    async with asyncio.timeout(10):  # the deployment's record follows the catch-up
        while (await _node_status(leader, dep["id"], "w2")) != "present":
            await asyncio.sleep(0.2)


async def _node_status(leader: Any, dep_id: str, node: str) -> str:
    _, doc = await leader.api.request("GET", f"/v1/deployments/{dep_id}")
    return str(doc["nodes"][node]["status"])


async def test_revoked_node_is_disconnected_and_refused(
    leader_factory: Callable[..., Any],
    registry: Registry,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
) -> None:
    """DELETE /v1/nodes/{id} closes the link; the worker stops (exit 3) and is refused after."""
    leader = await leader_factory(leader=TLS)
    w1, _ = await _cluster(leader, registry, worker_engines, worker_process)
    node_id = (await leader.api.nodes())["w1"]["id"]

    status, _ = await leader.api.request("DELETE", f"/v1/nodes/{node_id}")

    assert status == 200
    assert await asyncio.to_thread(w1.wait_exit, 20) == 3
    assert "the leader revoked this node" in w1.log_text()  # told by the 4403 close itself
    assert "link.reconnect" not in w1.log_text()
    assert "w1" not in await leader.api.nodes()
    w1.start()
    assert await asyncio.to_thread(w1.wait_exit, 20) == 3
    assert "this node was revoked" in w1.log_text() or "refused this node" in w1.log_text()


async def test_wrong_join_token_is_refused(
    leader_factory: Callable[..., Any], worker_engines: list[Dockerd], worker_process: WorkerFactory
) -> None:
    """A token with the right CA pin and a wrong secret does not enrol the worker."""
    leader = await leader_factory(leader=TLS)
    good = await leader.api.join_token()
    forged = good.rsplit("-", 1)[0] + "-not-the-secret"
    worker = worker_process("forger", worker_engines[0], leader.url, forged).start()

    assert await asyncio.to_thread(worker.wait_exit, 30) == 2  # not restarted: a config error
    assert "join token is not valid" in worker.log_text()
    assert await leader.api.nodes() == {}


async def test_a_join_whose_answer_was_lost_is_repeated_and_gets_the_same_node(
    leader_factory: Callable[..., Any], worker_engines: list[Dockerd], worker_process: WorkerFactory
) -> None:
    """The leader enrolled the node but the worker never saw the answer: at its next start
    the worker joins again with the secret it proposed and kept, and gets the same node
    instead of "already enrolled". Another secret for that name is still refused, and so
    is a proposed secret short enough to guess."""
    leader = await leader_factory(leader=TLS)
    token = await leader.api.join_token()
    worker = worker_process("unlucky", worker_engines[0], leader.url, token)
    secret = proposed_secret(worker.state_dir)
    first = {"token": token, "name": "unlucky", "secret": secret}
    status, lost_answer = await leader.api.request("POST", "/v1/join", json=first)
    assert status == 201

    worker.start()
    nodes = await leader.api.wait_nodes(unlucky=True)

    assert [node["id"] for node in nodes.values()] == [lost_answer["node_id"]]
    assert not (worker.state_dir / PROPOSAL_FILE).exists()
    other = {**first, "secret": new_secret()}
    status, doc = await leader.api.request("POST", "/v1/join", json=other)
    assert status == 409, doc
    guessable = {**first, "name": "other", "secret": "short"}
    status, doc = await leader.api.request("POST", "/v1/join", json=guessable)
    assert status == 400, doc


async def test_leader_with_another_ca_is_refused(
    leader_factory: Callable[..., Any], worker_engines: list[Dockerd], worker_process: WorkerFactory
) -> None:
    """A token that pins leader A's CA refuses leader B, whose CA differs."""
    leader_a = await leader_factory(leader=TLS)
    leader_b = await leader_factory(leader=TLS)
    token_a = await leader_a.api.join_token()
    await leader_b.api.join_token()
    worker = worker_process("misled", worker_engines[0], leader_b.url, token_a).start()

    assert await asyncio.to_thread(worker.wait_exit, 30) == 2  # not restarted: a config error
    assert "does not match the join token's pin" in worker.log_text()
    assert await leader_b.api.nodes() == {}


@pytest.mark.parametrize(
    "garbage", ["not json", '{"type": "pull_result", "v": 1, "ok": "yes"}', '{"type": "hello"}']
)
async def test_malformed_messages_close_that_link_only(
    leader_factory: Callable[..., Any],
    registry: Registry,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    tmp_path: Path,
    garbage: str,
) -> None:
    """A node sending a bad message is closed with 4400; the real workers keep working."""
    leader = await leader_factory(leader=TLS)
    await _cluster(leader, registry, worker_engines, worker_process)
    rogue = await _enrol_raw(leader, "rogue")
    async with await _link(leader, rogue) as ws:
        await ws.send_str(garbage)
        msg = await ws.receive(timeout=10)
        while msg.type == 1:  # TEXT: the leader's Sync came first
            msg = await ws.receive(timeout=10)
        assert ws.close_code == 4400

    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "unbothered")
    final = await leader.api.wait_final(dep["id"])
    assert final["state"] == "succeeded"
    assert final["nodes"]["w1"]["status"] == final["nodes"]["w2"]["status"] == "present"


async def test_an_unknown_message_type_is_skipped_and_the_link_stays(
    leader_factory: Callable[..., Any],
) -> None:
    """A newer worker's message type is logged and skipped: the link stays up, and the
    node's next message is taken."""
    leader = await leader_factory(leader=TLS)
    rogue = await _enrol_raw(leader, "newer")
    async with await _link(leader, rogue) as ws:
        await ws.send_str('{"type": "launch_missiles", "v": 3, "target": "moon"}')
        await ws.send_str('{"type": "credentials_ack", "v": 1, "version": 7, "new": true}')
        async with asyncio.timeout(10):
            while (await leader.api.nodes())["newer"]["credentials_version"] != 7:
                await asyncio.sleep(0.05)
        assert not ws.closed


async def test_a_worker_that_never_answers_fails_the_distribution_by_name(
    leader_factory: Callable[..., Any],
    registry: Registry,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    tmp_path: Path,
) -> None:
    """A linked node that takes the pull order and never answers holds the round only
    until shortly before the stage deadline: the deployment then fails naming that node,
    with the other node's answer kept, instead of a bare stage timeout."""
    leader = await leader_factory(leader={**TLS, "stage_timeouts": {"distributing": 6}})
    await _cluster(leader, registry, worker_engines[:1], worker_process)
    async with await _link(leader, await _enrol_raw(leader, "silent")) as ws:
        reading = asyncio.create_task(_read_forever(ws))  # answers pings, never a pull
        dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "unanswered")
        final = await leader.api.wait_final(dep["id"])
        reading.cancel()

    assert final["state"] == "failed"
    assert final["error"]["code"] == "distribution_failed", final["error"]
    assert final["nodes"]["w1"]["status"] == "present"
    assert final["nodes"]["silent"]["status"] == "failed"
    assert final["nodes"]["silent"]["error"].startswith("no answer within 5 s")
    assert "silent: no answer" in final["error"]["message"]


async def _read_forever(ws: Any) -> None:
    while not ws.closed:
        await ws.receive()


async def test_the_leader_declines_permessage_deflate(
    leader_factory: Callable[..., Any],
) -> None:
    """A client offering permessage-deflate gets plain frames: no zlib state per link."""
    leader = await leader_factory(leader=TLS)
    async with await _link(leader, await _enrol_raw(leader, "deflater"), compress=15) as ws:
        sync = await ws.receive(timeout=10)
        assert sync.type == 1  # TEXT: the Sync
        assert ws.compress == 0


async def _enrol_raw(leader: InProcessLeader, name: str) -> dict[str, str]:
    token = await leader.api.join_token()
    status, doc = await leader.api.request("POST", "/v1/join", json={"token": token, "name": name})
    assert status == 201, doc
    return dict(doc)


async def _link(leader: InProcessLeader, identity: dict[str, str], **options: Any) -> Any:
    url = leader.url.replace("https", "wss") + "/v1/agent"
    return await leader.api.session.ws_connect(
        url,
        headers={"Authorization": f"Node {identity['node_id']}:{identity['secret']}"},
        ssl=leader.api.ssl,
        **options,
    )


async def test_worker_whose_engine_fails_fails_the_distribution_naming_it(
    leader_factory: Callable[..., Any],
    registry: Registry,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    tmp_path: Path,
) -> None:
    """With one worker's engine stopped, the deployment is distribution_failed naming it."""
    broken = Dockerd()
    broken.start()
    try:
        leader = await leader_factory(leader=TLS)
        await _cluster(
            leader, registry, [worker_engines[0], broken], worker_process, pull_retry_budget=3
        )
        broken.stop()

        dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "halfway")
        final = await leader.api.wait_final(dep["id"])
    finally:
        broken.stop()

    assert final["state"] == "failed"
    assert final["error"]["code"] == "distribution_failed"
    assert "w2" in final["error"]["message"]
    assert "w1" not in final["error"]["message"]
    assert final["nodes"]["w1"]["status"] == "present"
    assert final["nodes"]["w2"]["status"] == "failed"


async def test_a_worker_that_stops_reading_does_not_delay_the_others(
    leader_factory: Callable[..., Any],
    registry: Registry,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    tmp_path: Path,
) -> None:
    """With a connected node that never reads, each real worker gets its pull order within 1 s."""
    leader = await leader_factory(leader=TLS)
    await _cluster(leader, registry, worker_engines, worker_process)
    assert leader.leader.ctx is not None
    hub, creds = leader.leader.ctx.hub, leader.leader.ctx.registry.current
    stuck = await _link(leader, await _enrol_raw(leader, "stuck"))
    try:
        await leader.api.wait_nodes(stuck=True)
        for version in range(1000, 1200):  # fill the stuck node's socket buffers
            hub.set_credentials(creds, version)
            await asyncio.sleep(0.002)
        hub.set_credentials(creds, creds.version if creds else 0)

        dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "nodelay")
        final = await leader.api.wait_final(dep["id"])
    finally:
        await stuck.close()

    events = await leader.api.events(dep["id"])
    ordered_at = next(e["at"] for e in events if e["type"] == "distribution")
    for node in ("w1", "w2"):
        first = next(e["at"] for e in events if e["type"] == "pull" and e["node"] == node)
        assert first - ordered_at < 1.0, (node, first - ordered_at)
    assert final["state"] == "succeeded", final
    assert final["nodes"]["w1"]["status"] == final["nodes"]["w2"]["status"] == "present"
    assert final["nodes"]["stuck"]["status"] == "pending"


CANARY = CANARY_VALUES.registry_password


async def test_canary_password_reaches_no_log_response_or_worker_disk(
    leader_process: Callable[..., LeaderProcess],
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    tmp_path: Path,
) -> None:
    """The registry password travels to workers yet shows up in no log, response or file."""
    registry = Registry(password=CANARY)
    registry.start()
    try:
        leader = leader_process(leader=TLS)
        leader.start()
        workers = await _cluster(leader, registry, worker_engines, worker_process)
        dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "canary")
        final = await leader.api.wait_final(dep["id"])
        assert final["state"] == "succeeded", final
        await leader.api.nodes()
    finally:
        registry.cleanup()
    for worker in workers:
        worker.terminate()
    leader.terminate()

    texts = {"leader log": leader.log_text(), "responses": "\n".join(leader.api.responses)}
    for worker in workers:
        texts[f"{worker.name} log"] = worker.log_text()
        for path in worker.workdir.rglob("*"):
            if path.is_file():
                texts[str(path)] = path.read_text(errors="replace")
    assert [name for name, text in texts.items() if CANARY in text] == []
    assert any("credentials.updated" in t for t in texts.values())  # workers did receive them


async def test_worker_reconnects_after_a_leader_restart_without_spinning(
    leader_factory: Callable[..., Any],
    registry: Registry,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
) -> None:
    """Down for 4 s, the leader comes back; the worker reconnects in a handful of attempts."""
    leader = await leader_factory(leader=TLS)
    (w1,) = await _cluster(leader, registry, worker_engines[:1], worker_process)
    await leader.stop()
    await asyncio.sleep(4)

    same_place = {**TLS, "listen": leader.raw["leader"]["listen"]}
    again = await leader_factory(state_dir=leader.config.state_dir, leader=same_place)
    await again.api.wait_nodes(timeout=20, w1=True)

    attempts = w1.log_text().count('"link.reconnect"')
    assert 1 <= attempts <= 6
