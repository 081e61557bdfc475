"""The registry goes away during a push: an outage shorter than the retry budget costs
no deployment; a longer one fails as `registry_unreachable` soon after the budget."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.cluster.harness import LEADER, Cluster, first_event, measured, metric, since
from tests.support.api import Api
from tests.support.contexts import bulky_context, busybox_context

OUTAGE_S = 60.0
SHORT_BUDGET_S = 10.0
RETRIES_METRIC = "deploy_agent_push_retries_total"


@pytest.mark.timeout(200)
async def test_a_60_s_registry_outage_mid_push_costs_no_deployment(
    cluster: Cluster, api: Api, tmp_path: Path
) -> None:
    """Killed mid-push and back after 60 s on the same data, the registry takes the
    retried push; the deployment succeeds and the retries are counted."""
    cluster.hosts.throttle_loopback(LEADER, 40)  # a 24 MiB layer takes seconds to push
    retries_before = await metric(api, RETRIES_METRIC)
    dep = await api.deploy_dir(bulky_context(tmp_path / "c", 24), "outage")
    await first_event(api, dep["id"], _pushing_bytes, timeout=60)
    cluster.registry.kill()
    down_at = time.monotonic()
    await asyncio.sleep(OUTAGE_S)
    await asyncio.to_thread(cluster.registry.start)
    up_at = time.monotonic()

    final = await api.wait_final(dep["id"], timeout=120)

    assert final["state"] == "succeeded", final["error"]
    retries = await metric(api, RETRIES_METRIC) - retries_before
    events = await api.events(dep["id"])
    recorded = [e for e in events if e["type"] == "push.retry"]
    assert final["push_retries"] >= 1
    assert retries == final["push_retries"] == len(recorded)
    assert all(node["status"] == "present" for node in final["nodes"].values())
    measured(
        {
            "scenario": "registry_down_60s_mid_push",
            "outage_s": round(up_at - down_at, 2),
            "push_retries": final["push_retries"],
            "push_stage_s": round(final["stages"]["pushing"]["seconds"], 2),
            "pushed_after_registry_up_s": since(up_at),
        }
    )


def _pushing_bytes(event: dict[str, object]) -> bool:
    current = event.get("current")
    return event["type"] == "push" and event.get("status") == "Pushing" and bool(current)


async def test_a_registry_down_past_the_budget_fails_as_unreachable_soon_after_it(
    cluster: Cluster, api: Api, tmp_path: Path
) -> None:
    """With a 10 s budget and the registry down, the deployment fails with
    `registry_unreachable` within the budget plus 10 s of the push starting."""
    await asyncio.to_thread(
        cluster.reconfigure_leader,
        push_retry_budget=SHORT_BUDGET_S,
        stage_timeouts={"building": 120, "pushing": SHORT_BUDGET_S + 30},
    )
    cluster.registry.kill()

    dep = await api.deploy_dir(busybox_context(tmp_path / "c"), "unreachable")
    final = await api.wait_final(dep["id"], timeout=90)

    assert final["state"] == "failed"
    assert final["error"]["code"] == "registry_unreachable", final["error"]
    pushing = final["stages"]["pushing"]
    took = pushing["finished_at"] - pushing["started_at"]
    assert took <= SHORT_BUDGET_S + 10
    assert final["push_retries"] >= 1
    measured(
        {
            "scenario": "registry_down_past_budget",
            "budget_s": SHORT_BUDGET_S,
            "push_start_to_failure_s": round(took, 2),
            "push_retries": final["push_retries"],
        }
    )
