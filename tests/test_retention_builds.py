"""Retention and builds on one engine: no image goes while a build there may use it.

A build may use any image of its engine (its parents, and every image the builder reads
as a cache candidate), so retention on the engine that builds waits until no build runs
there. A build that still loses an image under it (an operator's prune) runs once more.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.engine import Engine
from agent.errors import BuildError
from agent.leader.pipeline import build_gate
from agent.leader.pipeline.build_gate import BuildGate
from agent.retention import APP_LABEL
from tests.support.contexts import busybox_context, run_step
from tests.support.dockerd import Dockerd


def _app_images(engine: Dockerd, app: str) -> set[str]:
    listed = engine.cli("images", "-q", "--no-trunc", "--filter", f"label={APP_LABEL}={app}")
    return set(listed.stdout.split())


async def _when_any_goes(engine: Dockerd, app: str, images: set[str], timeout: float) -> float:
    """When one of `images` was first seen gone from the engine (polled)."""
    async with asyncio.timeout(timeout):
        while images <= await asyncio.to_thread(_app_images, engine, app):
            await asyncio.sleep(0.05)
    return time.time()


async def test_retention_waits_while_another_app_builds_on_the_engine(
    leader_factory: Callable[..., Any], dockerd: Dockerd, tmp_path: Path
) -> None:
    """With keep_images = 1, app `old`'s second deployment succeeds while app `slow` is
    building on the same engine: `old`'s first image does not go until that build has
    ended; then retention removes it (before: at once, under the build)."""
    leader = await leader_factory(leader={"keep_images": 1})
    first = await leader.api.deploy_dir(busybox_context(tmp_path / "old0"), "old")
    assert (await leader.api.wait_final(first["id"]))["state"] == "succeeded"
    await leader.api.wait_retention(first["id"])
    old_images = _app_images(dockerd, "old")
    assert len(old_images) == 1
    slow = busybox_context(tmp_path / "slow", run_step("sleep 4"))
    slow_dep = await leader.api.deploy_dir(slow, "slow")
    await leader.api.wait_state(slow_dep["id"], "building")
    last = await leader.api.deploy_dir(busybox_context(tmp_path / "old1"), "old")
    assert (await leader.api.wait_final(last["id"]))["state"] == "succeeded"

    vanished_at = await _when_any_goes(dockerd, "old", old_images, timeout=60)
    slow_events = await leader.api.events(slow_dep["id"])
    assert [e["state"] for e in slow_events if e["type"] == "state"][-1] == "succeeded"
    build_ended_at = max(e["at"] for e in slow_events if e["type"] == "log")
    assert vanished_at >= build_ended_at, "an image went while a build ran on the engine"
    (retention,) = await leader.api.wait_retention(last["id"], timeout=60)
    assert retention["removed"] == 1, retention
    assert len(_app_images(dockerd, "old")) == 1


async def test_a_build_that_lost_an_image_under_it_runs_once_more(
    leader_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's "unable to find image" (an image removed mid-build by something
    else than retention) fails the build once: it runs again and the deployment
    succeeds, with a `build.retry` event saying why. A second such failure fails it."""
    real_build = Engine.build
    failures = [1]

    async def build(self: Engine, *args: Any, **kwargs: Any) -> str:
        if failures[0]:
            failures[0] -= 1
            raise BuildError('unable to find image "sha256:' + "0" * 64 + '"', [])
        return await real_build(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "build", build)
    leader = await leader_factory()
    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "once"), "once")
    dep = await leader.api.wait_final(dep["id"])
    assert dep["state"] == "succeeded", dep
    retries = [e for e in await leader.api.events(dep["id"]) if e["type"] == "build.retry"]
    assert [e["error"] for e in retries] == ['unable to find image "sha256:' + "0" * 64 + '"']

    failures[0] = 2
    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "twice"), "twice")
    dep = await leader.api.wait_final(dep["id"])
    assert dep["state"] == "failed"
    assert dep["error"]["code"] == "build_failed"
    assert "unable to find image" in dep["error"]["message"]


async def test_the_gate_holds_removals_until_builds_end_and_then_holds_new_builds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Removals wait for the builds under way; builds go on starting beside them until
    the removals' patience ends, then wait for the removals to have run."""
    monkeypatch.setattr(build_gate, "PRUNE_PATIENCE_S", 0.2)
    gate = BuildGate()
    order: list[str] = []

    async def hold_build(name: str, seconds: float) -> None:
        async with gate.build():
            order.append(f"{name} started")
            await asyncio.sleep(seconds)
            order.append(f"{name} ended")

    async def prune() -> None:
        async with gate.prune():
            order.append("prune")

    first = asyncio.create_task(hold_build("b1", 0.6))
    await asyncio.sleep(0.05)
    pruning = asyncio.create_task(prune())
    await asyncio.sleep(0.05)
    beside = asyncio.create_task(hold_build("b2", 0.1))  # within the patience: starts
    await asyncio.sleep(0.3)
    held = asyncio.create_task(hold_build("b3", 0.1))  # past it: waits for the prune
    await asyncio.wait_for(asyncio.gather(first, pruning, beside, held), 5)
    assert order == [
        "b1 started",
        "b2 started",
        "b2 ended",
        "b1 ended",
        "prune",
        "b3 started",
        "b3 ended",
    ], json.dumps(order)
