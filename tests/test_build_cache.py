"""Build cache: layers reused from the app's previous image on an engine that never built
it, and the building engine's cache kept under leader.build_cache_max."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.contexts import busybox_context, run_step
from tests.support.dockerd import Dockerd
from tests.support.leader import InProcessLeader
from tests.support.registry import Registry

LeaderFactory = Callable[..., Any]
DEPENDENCIES = "echo installing; /bin/busybox sleep 1; cat /deps.txt > /deps.out"


def _app(directory: Path) -> Path:
    """A context with a slow dependency step before the app's source is copied in."""
    busybox_context(
        directory, "COPY deps.txt /deps.txt", run_step(DEPENDENCIES), "COPY app.txt /app.txt"
    )
    (directory / "deps.txt").write_text("dependency list\n")
    (directory / "app.txt").write_text("version 1\n")
    return directory


def _ending(events: list[dict[str, Any]], part: str) -> str:
    (status,) = [
        e["status"]
        for e in events
        if e["type"] == "step" and part in e["name"] and e["status"] != "running"
    ]
    return str(status)


async def test_a_new_build_engine_reuses_the_layers_of_the_image_in_the_registry(
    leader_factory: LeaderFactory,
    registry: Registry,
    worker_engines: list[Dockerd],
    tmp_path: Path,
) -> None:
    """The app's first deployment is built and pushed by one engine; the leader then
    moves to an engine that never built it: that engine pulls the previous image for
    its inline cache, and the dependency step is CACHED there, only the changed source
    is built again."""
    state = tmp_path / "state"
    first = await leader_factory(state_dir=state)
    status, _ = await first.api.put_registry(registry.host, registry.username, registry.password)
    assert status == 200
    context = _app(tmp_path / "app")
    dep = await first.api.deploy_dir(context, "moving")
    built = await first.api.wait_final(dep["id"])
    assert built["state"] == "succeeded", built["error"]
    assert _ending(await first.api.events(dep["id"]), "installing") == "done"
    await first.stop()

    second = await leader_factory(state_dir=state, engine={"url": worker_engines[1].url})
    (context / "app.txt").write_text("version 2\n")
    dep = await second.api.deploy_dir(context, "moving")
    final = await second.api.wait_final(dep["id"])
    events = await second.api.events(dep["id"])

    assert final["state"] == "succeeded", final["error"]
    (build,) = [e for e in events if e["type"] == "build"]
    assert build["cache_from"] == [built["image"]]
    assert [e["status"] for e in events if e["type"] == "cache"] == ["pulling", "pulled"]
    assert _ending(events, "installing") == "cached"
    assert _ending(events, "COPY app.txt") == "done"


async def test_the_build_cache_is_pruned_to_its_limit_but_never_during_a_build(
    leader_factory: LeaderFactory, tmp_path: Path
) -> None:
    """With leader.build_cache_max at 0, what a deployment's build left in the cache goes
    once it has succeeded; a prune asked for while a build runs does nothing (None)."""
    leader: InProcessLeader = await leader_factory(leader={"build_cache_max": 0})
    context = busybox_context(
        tmp_path / "c", run_step("/bin/busybox dd if=/dev/zero of=/filler bs=1M count=4")
    )
    dep = await leader.api.deploy_dir(context, "pruned")
    assert (await leader.api.wait_final(dep["id"]))["state"] == "succeeded"
    freed = [e for e in await leader.api.wait_retention(dep["id"], 2) if "build_cache_freed" in e]

    assert leader.leader.ctx is not None
    builders = leader.leader.ctx.builders
    async with builders.building():
        during = await builders.prune_build_cache(0)
    after = await asyncio.wait_for(builders.prune_build_cache(0), 60)

    assert freed and freed[0]["build_cache_freed"] > 0, freed
    assert during is None
    assert after is not None
