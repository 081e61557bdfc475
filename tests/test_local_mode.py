"""Local mode: a cluster of one leader builds on its own engine and never touches a registry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.contexts import busybox_context, run_step
from tests.support.dockerd import Dockerd
from tests.support.engine_proxy import refusing
from tests.support.leader import InProcessLeader
from tests.support.registry import Registry


async def test_local_deployment_keeps_the_image_local_and_sends_no_registry_request(
    leader: InProcessLeader, registry: Registry, dockerd: Dockerd, tmp_path: Path
) -> None:
    """With the registry removed, a deployment builds `{app}:{id}`; the registry sees 0 requests."""
    api = leader.api
    status, _ = await api.put_registry(registry.host, registry.username, registry.password)
    assert status == 200
    status, _ = await api.request("DELETE", "/v1/registry")
    assert status == 200
    status, cluster = await api.request("GET", "/v1/cluster")
    assert cluster["mode"] == "local", cluster
    seen_before = registry.request_count()
    context = busybox_context(tmp_path / "ctx", run_step("echo built-here"))

    dep = await api.deploy_dir(context, "hello")
    final = await api.wait_final(dep["id"])

    assert final["state"] == "succeeded", final
    assert final["mode"] == "local"
    assert final["image"] == f"hello:{dep['id']}"
    assert final["digest"] is None
    assert set(final["stages"]) == {"building"}
    assert registry.request_count() == seen_before
    inspect = dockerd.cli("image", "inspect", "--format", "{{json .RepoDigests}}", final["image"])
    assert inspect.stdout.strip() == "[]"
    out = dockerd.cli("run", "--rm", "--network", "none", final["image"])
    assert out.stdout.strip() == "hello"


async def test_build_log_lines_are_events_that_replay_from_the_start(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """Every build log line is an event, and a follower that joins after the end replays them."""
    context = busybox_context(tmp_path / "ctx", run_step("echo marker-line-42"))
    dep = await leader.api.deploy_dir(context, "logs")
    await leader.api.wait_final(dep["id"])

    events = await leader.api.events(dep["id"])

    lines = [e["line"] for e in events if e["type"] == "log"]
    assert "marker-line-42" in lines
    states = [e["state"] for e in events if e["type"] == "state"]
    assert states == ["queued", "building", "succeeded"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


async def test_deployments_without_services_keep_only_the_newest_images(
    leader_factory: Callable[..., Any], dockerd: Dockerd, tmp_path: Path
) -> None:
    """Retention follows every successful deployment, not only releases: with
    keep_images = 2, three builds of an app leave its two newest images."""
    leader = await leader_factory(leader={"keep_images": 2})
    finals = []
    for i in range(3):
        context = busybox_context(tmp_path / f"c{i}", run_step(f"echo {i} > /built"))
        dep = await leader.api.deploy_dir(context, "unreleased")
        finals.append(await leader.api.wait_final(dep["id"]))
    assert [f["state"] for f in finals] == ["succeeded"] * 3
    await leader.api.wait_retention(finals[-1]["id"])
    kinds = [e.get("state", e["type"]) for e in await leader.api.events(finals[-1]["id"])]
    assert kinds[-2:] == ["succeeded", "retention"]  # housekeeping after the outcome

    held = dockerd.cli(
        "image", "ls", "--filter", "label=deploy-agent.app=unreleased", "--format", "{{.Tag}}"
    ).stdout.split()
    assert sorted(held) == sorted(f["id"] for f in finals[1:])


async def test_a_finished_deployments_history_goes_after_history_days(
    leader_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A leader started past a deployment's history_days deletes its events (build log
    and all); the deployment itself still answers, final, and its event stream ends."""
    first = await leader_factory()
    dep = await first.api.deploy_dir(busybox_context(tmp_path / "c", run_step("echo a")), "old")
    final = await first.api.wait_final(dep["id"])
    assert any(e.get("type") == "log" for e in await first.api.events(dep["id"]))
    await first.stop()
    await asyncio.sleep(0.5)  # history_days 1e-6 is 0.09 s

    second = await leader_factory(state_dir=first.config.state_dir, leader={"history_days": 1e-6})
    async with asyncio.timeout(10):
        while await second.api.events(dep["id"]):
            await asyncio.sleep(0.1)

    status, doc = await second.api.request("GET", f"/v1/deployments/{dep['id']}")
    assert status == 200
    assert doc["state"] == final["state"] == "succeeded"


@pytest.fixture
async def images_vanishing(dockerd: Dockerd) -> AsyncIterator[str]:
    """The engine, but every removal of an image by id answered 404, as for an image the
    retention of the deployment before removed meanwhile (set up before the leader)."""
    async with refusing(dockerd.sock, "DELETE", r"/images/sha256:[0-9a-f]+$", 404) as url:
        yield url


async def test_images_removed_meanwhile_do_not_fail_retention(
    images_vanishing: str, leader_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """Retention runs after the final state, so a deployment's may run while the next
    one's does: an image the other removed is skipped, not an error."""
    leader = await leader_factory(engine={"url": images_vanishing}, leader={"keep_images": 1})
    for i in range(2):
        dep = await leader.api.deploy_dir(busybox_context(tmp_path / f"c{i}"), "vanishing")
        final = await leader.api.wait_final(dep["id"])
        assert final["state"] == "succeeded", final["error"]
    (retention,) = await leader.api.wait_retention(dep["id"])
    assert "error" not in retention, retention
    assert retention["removed"] == 0
