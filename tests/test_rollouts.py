"""The rollout runner's decisions, with a stand-in for the worker links (fast: no
engine, no worker) and a real store: one rollout at a time, a resumed rollout with a
failed step stays failed, and a step waits for its node to come back after a restart.

Real workers going through real upgrades are in test_upgrades.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent import wire
from agent.errors import RequestError
from agent.leader.links import upgrades
from agent.leader.links.upgrades import Rollouts
from agent.leader.state.journal import Journal
from agent.leader.state.models import NodeInfo, NodeRecord
from agent.leader.state.rollouts import NodeStep, Rollout, RolloutState
from agent.leader.state.store import Store

WHEEL = wire.UpgradeFile(name="deploy_agent-9.0-py3-none-any.whl", sha256="0" * 64, size=1)


class Links:
    """The part of the hub a rollout uses: which nodes are linked, and what they said."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeRecord] = {}
        self.sent: list[tuple[str, wire.ToWorker]] = []
        self._listeners: list[Any] = []

    def listen(self, listener: Any) -> None:
        self._listeners.append(listener)

    def introduced(self, node_id: str) -> bool:
        return node_id in self.nodes

    def node(self, node_id: str) -> NodeRecord | None:
        return self.nodes.get(node_id)

    def send_to(self, node_id: str, message: wire.ToWorker) -> bool:
        self.sent.append((node_id, message))
        return node_id in self.nodes

    def hello(self, node_id: str, version: str) -> None:
        """The node links, and says it runs `version` (an upgradable protocol-2 worker)."""
        info = NodeInfo(agent_version=version, engine_version="27.0", protocol=2, upgradable=True)
        self.nodes[node_id] = node = NodeRecord(id=node_id, name=node_id, enrolled_at=0, info=info)
        hello = wire.Hello(
            name=node_id, agent_version=version, engine_version="27.0", arch="x86_64"
        )
        for listener in self._listeners:
            listener(node, hello)


def _rollout(*steps: NodeStep) -> Rollout:
    return Rollout(
        id="up-20261208000000-0123abcd",
        version="9.0",
        wheel=WHEEL,
        dependencies=[],
        node_timeout=60,
        steps=list(steps),
        created_at=time.time(),
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = Store(tmp_path / "leader.db")
    await opened.open()
    yield opened
    await opened.close()


def _runner(store: Store, links: Links, tmp_path: Path) -> Rollouts:
    return Rollouts(store, links, Journal(store), tmp_path / "upgrades")  # type: ignore[arg-type]


async def _final(store: Store, rollout_id: str) -> Rollout:
    async with asyncio.timeout(10):
        while (found := await store.rollout(rollout_id)) is None or not found.state.final:
            await asyncio.sleep(0.02)
    return found


async def test_a_second_rollout_is_refused_while_one_runs(store: Store, tmp_path: Path) -> None:
    """Two starts at once: the second is refused (409) before anything of it is saved,
    even while the first is still being written."""
    links = Links()
    runner = _runner(store, links, tmp_path)
    first = _rollout(NodeStep(node_id="w1", name="w1"))
    second = _rollout(NodeStep(node_id="w2", name="w2"))
    second.id = "up-20261208000001-0123abcd"
    starting = asyncio.create_task(runner.start(first))
    await asyncio.sleep(0)  # the first is between its check and its save
    with pytest.raises(RequestError) as refused:
        await runner.start(second)
    await starting
    assert refused.value.status == 409
    assert await store.rollout(second.id) is None
    await runner.stop()


async def test_a_resumed_rollout_with_a_failed_step_fails_and_orders_nothing(
    store: Store, tmp_path: Path
) -> None:
    """A leader that stopped just after a node failed (before the rollout's end was
    saved) resumes it as failed: the nodes after it are never ordered."""
    links = Links()
    links.hello("w2", "8.0")
    failed = NodeStep(node_id="w1", name="w1", status="failed", detail="rolled back")
    rollout = _rollout(failed, NodeStep(node_id="w2", name="w2"))
    await store.save_rollout(rollout)
    runner = _runner(store, links, tmp_path)

    await runner.resume()
    final = await _final(store, rollout.id)

    assert final.state is RolloutState.FAILED
    assert final.error == "w1: rolled back"
    assert links.sent == []


async def test_after_a_restart_a_step_waits_for_its_node_to_come_back(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resumed, the leader has no links yet: the node's step waits for it (up to the
    grace) instead of skipping it as offline, orders it once it is back, and counts it
    upgraded once it says it runs the release."""
    monkeypatch.setattr(upgrades, "READY_GRACE_S", 5.0)
    links = Links()
    rollout = _rollout(NodeStep(node_id="w1", name="w1"))
    await store.save_rollout(rollout)
    runner = _runner(store, links, tmp_path)

    await runner.resume()
    await asyncio.sleep(0.3)
    assert links.sent == []
    links.hello("w1", "8.0")
    async with asyncio.timeout(5):
        while not links.sent:
            await asyncio.sleep(0.02)
    links.hello("w1", "9.0")
    final = await _final(store, rollout.id)

    assert final.state is RolloutState.SUCCEEDED
    assert [(s.name, s.status) for s in final.steps] == [("w1", "upgraded")]
    (node_id, order), *_ = links.sent
    assert node_id == "w1" and isinstance(order, wire.UpgradeOrder)
    assert 0 < order.within_s <= rollout.node_timeout


async def test_a_node_that_stays_away_is_skipped_by_name(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that does not come back within the grace is skipped, named as offline."""
    monkeypatch.setattr(upgrades, "READY_GRACE_S", 0.3)
    links = Links()
    runner = _runner(store, links, tmp_path)
    rollout = _rollout(NodeStep(node_id="w1", name="w1"))
    await runner.start(rollout)
    final = await _final(store, rollout.id)
    assert final.state is RolloutState.SUCCEEDED
    assert (final.steps[0].status, "offline" in (final.steps[0].detail or "")) == (
        "skipped",
        True,
    )
