"""Workers fail mid-pull and while credentials change: the leader notices, the
deployment says which node, and the node catches up on its own once it is back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import Cluster, first_event, measured, since, sleep_until
from tests.support.api import Api
from tests.support.contexts import bulky_context

PULL_MBIT = 16  # a 12 MiB layer takes about 6 s to reach a worker
BULK_MIB = 12
GONE_WITHIN_S = 20.0


def _pulling(node: str) -> Any:
    def match(event: dict[str, Any]) -> bool:
        return event["type"] == "pull" and event.get("node") == node and bool(event.get("current"))

    return match


async def _connected(api: Api, node: str) -> bool:
    return bool((await api.nodes())[node]["connected"])


@pytest.mark.parametrize("fault", ["kill", "cut"])
async def test_a_worker_lost_mid_pull_is_named_and_catches_up_when_back(
    cluster: Cluster, api: Api, tmp_path: Path, fault: str
) -> None:
    """Killed or cut off mid-pull, w1 is seen gone within 20 s, the deployment names it
    pending, and once back it holds the image without a new deployment."""
    cluster.hosts.throttle("w1", PULL_MBIT)
    dep = await api.deploy_dir(bulky_context(tmp_path / "c", BULK_MIB), f"lost-{fault}")
    await first_event(api, dep["id"], _pulling("w1"), timeout=90)
    if fault == "kill":
        cluster.kill(cluster.workers["w1"])
    else:
        cluster.cut("w1")
    faulted = time.monotonic()
    gone_s = await sleep_until(
        lambda: _not(_connected(api, "w1")), GONE_WITHIN_S, "leader sees w1 gone"
    )
    final = await api.wait_final(dep["id"], timeout=60)

    assert final["state"] == "succeeded", final["error"]
    assert final["nodes"]["w2"]["status"] == "present"
    assert final["nodes"]["w1"]["status"] == "pending"
    assert "dropped before it answered" in final["nodes"]["w1"]["reason"]
    assert not cluster.holds("w1", final["image"])
    healed = time.monotonic()
    if fault == "kill":
        await asyncio.to_thread(cluster.workers["w1"].start)
    else:
        cluster.hosts.heal("w1")
    caught_up_s = await sleep_until(
        lambda: asyncio.to_thread(cluster.holds, "w1", final["image"]), 60, "w1 catches up"
    )
    measured(
        {
            "scenario": f"worker_{fault}_mid_pull",
            "leader_saw_it_gone_s": gone_s,
            "down_s": round(healed - faulted, 2),
            "holds_image_after_heal_s": caught_up_s,
            "node_status": final["nodes"]["w1"],
        }
    )


async def _not(check: Any) -> bool:
    return not await check


async def test_credentials_rotated_while_a_worker_is_cut_off_reach_it_on_heal(
    cluster: Cluster, api: Api
) -> None:
    """w1 is cut off (the leader sees it gone) while the password changes; within 5 s of
    its link coming back it holds the new credentials version."""
    log_from = cluster.log_size("w1")
    cluster.cut("w1")
    cut_at = time.monotonic()
    await sleep_until(lambda: _not(_connected(api, "w1")), GONE_WITHIN_S, "leader sees w1 gone")
    gone_s = since(cut_at)
    registry = cluster.registry
    registry.set_password(f"rotated-{time.time_ns()}")
    await asyncio.to_thread(registry.restart)
    status, doc = await api.put_registry(registry.host, registry.username, registry.password)
    assert status == 200, doc
    version = doc["registry"]["version"]
    await sleep_until(
        lambda: _holds_version(api, "w2", version), 10, "connected w2 takes the new version"
    )
    assert (await api.nodes())["w1"]["credentials_version"] < version

    cluster.hosts.heal("w1")
    healed_s = await sleep_until(lambda: _holds_version(api, "w1", version), 5, "w1 catches up")

    measured(
        {
            "scenario": "credentials_rotated_while_cut_off",
            "leader_saw_it_gone_s": gone_s,
            "cut_s": round(since(cut_at) - healed_s, 2),
            "new_version_after_heal_s": healed_s,
            "reconnect_attempts": len(cluster.worker_events("w1", "link.reconnect", log_from)),
        }
    )


async def _holds_version(api: Api, node: str, version: int) -> bool:
    return bool((await api.nodes())[node]["credentials_version"] == version)


async def test_a_worker_engine_restarting_mid_pull_is_retried_and_succeeds(
    cluster: Cluster, api: Api, tmp_path: Path
) -> None:
    """w2's Docker Engine restarts mid-pull: the worker retries the pull, the deployment
    succeeds and w2 holds the image."""
    cluster.hosts.throttle("w2", PULL_MBIT)
    log_from = cluster.log_size("w2")
    dep = await api.deploy_dir(bulky_context(tmp_path / "c", BULK_MIB), "engine-restart")
    await first_event(api, dep["id"], _pulling("w2"), timeout=90)
    restarted = time.monotonic()
    await asyncio.to_thread(cluster.engines["w2"].restart)
    restart_s = since(restarted)

    final = await api.wait_final(dep["id"], timeout=90)

    assert final["state"] == "succeeded", final["error"]
    assert final["nodes"]["w2"]["status"] == "present"
    assert cluster.holds("w2", final["image"])
    retries = cluster.worker_events("w2", "pull.retry", log_from)
    assert len(retries) >= 1
    measured(
        {
            "scenario": "worker_engine_restart_mid_pull",
            "engine_restart_s": restart_s,
            "pull_retries": len(retries),
            "w2_pull_s": final["nodes"]["w2"]["seconds"],
        }
    )
