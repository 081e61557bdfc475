"""The leader is killed mid-deployment with workers connected and starts again on the
same state: every worker comes back without hammering it, and the deployment ends once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.cluster.harness import (
    LEADER,
    WORKERS,
    Cluster,
    first_event,
    measured,
    since,
    sleep_until,
)
from tests.support.api import Api
from tests.support.contexts import bulky_context

DOWN_S = 5.0  # as a service manager's restart delay would leave it
# Jittered backoff from 0.5 s doubling to 30 s: over a few seconds down, a handful of
# attempts; ten would mean the worker spins.
MAX_ATTEMPTS = 10
FINAL = {"succeeded", "failed", "cancelled"}


async def test_a_leader_killed_mid_push_loses_nothing_and_workers_reconnect_calmly(
    cluster: Cluster, api: Api, tmp_path: Path
) -> None:
    """SIGKILLed while pushing and started again 5 s later, the leader has both workers
    back within a bounded number of attempts each, and the deployment submitted before
    the kill reaches exactly one final state, succeeded."""
    cluster.hosts.throttle_loopback(LEADER, 40)  # the push takes seconds: kill inside it
    dep = await api.deploy_dir(bulky_context(tmp_path / "c", 16), "leader-restart")
    await first_event(api, dep["id"], lambda e: e.get("state") == "pushing", timeout=60)
    offsets = {name: cluster.log_size(name) for name in WORKERS}
    cluster.kill(cluster.leader)
    await asyncio.sleep(DOWN_S)
    started = time.monotonic()
    await asyncio.to_thread(cluster.leader.start)
    await api.wait_nodes(60, **dict.fromkeys(WORKERS, True))
    reconnected_s = since(started)

    final = await api.wait_final(dep["id"], timeout=120)

    events = await api.events(dep["id"])
    finals = [e for e in events if e["type"] == "state" and e.get("state") in FINAL]
    assert [e["state"] for e in finals] == ["succeeded"]
    assert final["attempts"] == 2
    attempts = {
        name: len(cluster.worker_events(name, "link.reconnect", offsets[name])) for name in WORKERS
    }
    connects = {
        name: len(cluster.worker_events(name, "link.connected", offsets[name])) for name in WORKERS
    }
    assert all(1 <= count <= MAX_ATTEMPTS for count in attempts.values()), attempts
    assert connects == dict.fromkeys(WORKERS, 1)
    for name in WORKERS:  # present now, or pending and caught up from the Sync
        await sleep_until(_holds(cluster, name, final["image"]), 30, f"{name} holds the image")
    measured(
        {
            "scenario": "leader_killed_mid_push",
            "leader_down_s": DOWN_S,
            "all_workers_back_after_start_s": reconnected_s,
            "reconnect_attempts": attempts,
            "deployment_attempts": final["attempts"],
            "nodes": {name: node["status"] for name, node in final["nodes"].items()},
        }
    )


def _holds(cluster: Cluster, host: str, image: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await asyncio.to_thread(cluster.holds, host, image)

    return check
