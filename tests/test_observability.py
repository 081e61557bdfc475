"""Metrics and the OpenAPI document, against a real leader."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from agent.leader.api.openapi import document
from agent.leader.server import build_app
from tests.support.contexts import busybox_context, run_step
from tests.support.leader import InProcessLeader

DASHBOARD = Path(__file__).parent.parent / "grafana" / "deploy-agent.json"
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _scrape_text(leader: InProcessLeader) -> str:
    async with leader.api.session.get(
        leader.api.base_url + "/metrics", headers={"Authorization": f"Bearer {leader.api.token}"}
    ) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return await response.text()


async def _scrape(leader: InProcessLeader) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return _samples(await _scrape_text(leader))


async def test_metrics_count_deployments_by_state_and_code_and_time_stages(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """After one success and one build failure, the counters (by state, code and kind)
    and histograms say so."""
    ok = await leader.api.deploy_dir(busybox_context(tmp_path / "a"), "metered")
    bad = await leader.api.deploy_dir(busybox_context(tmp_path / "b", run_step("exit 1")), "other")
    await leader.api.wait_final(ok["id"])
    await leader.api.wait_final(bad["id"])

    samples = await _scrape(leader)

    total = "deploy_agent_deployments_total"
    assert samples[(total, (("code", ""), ("kind", "build"), ("state", "succeeded")))] == 1
    failed = (("code", "build_failed"), ("kind", "build"), ("state", "failed"))
    assert samples[(total, failed)] == 1
    assert samples[("deploy_agent_stage_duration_seconds_count", (("stage", "building"),))] == 1
    assert samples[("deploy_agent_workers_enrolled", ())] == 0
    assert samples[("deploy_agent_workers_connected", ())] == 0
    assert ("deploy_agent_event_loop_lag_seconds", ()) in samples
    assert samples[("deploy_agent_push_retries_total", ())] == 0


async def test_grafana_dashboard_queries_only_metrics_the_leader_exports(
    leader: InProcessLeader,
) -> None:
    """Every metric name in the example dashboard's expressions is one /metrics serves."""
    families = text_string_to_metric_families(await _scrape_text(leader))
    exported = {
        f.name + suffix
        for f in families
        if f.name.startswith("deploy_agent_")
        for suffix in SUFFIXES[f.type]
    }
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    expressions = [t["expr"] for p in panels for t in p["targets"]]
    expressions.append(dashboard["templating"]["list"][1]["definition"])
    used = {name for expr in expressions for name in re.findall(r"\bdeploy_agent_\w+", expr)}

    assert all(p["targets"] for p in panels)
    assert used - exported == set()
    assert {n.removesuffix("_bucket") for n in used if n.endswith("_bucket")} == {
        "deploy_agent_stage_duration_seconds",
        "deploy_agent_pull_duration_seconds",
    }


async def test_metrics_need_the_api_token(leader: InProcessLeader) -> None:
    async with leader.api.session.get(leader.api.base_url + "/metrics") as response:
        assert response.status == 401


async def test_openapi_document_covers_every_route(leader: InProcessLeader) -> None:
    """Every route the leader serves is in /v1/openapi.json, and nothing else is."""
    status, served = await leader.api.request("GET", "/v1/openapi.json")
    assert status == 200
    assert served == document()
    assert leader.leader.ctx is not None and leader.leader.scheduler is not None
    assert leader.leader.rollouts is not None
    app = build_app(leader.leader.ctx, leader.leader.scheduler, leader.leader.rollouts)
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(method, path) for path, ops in served["paths"].items() for method in ops}
    assert documented == routes
    assert "DeploymentRequest" in served["components"]["schemas"]
