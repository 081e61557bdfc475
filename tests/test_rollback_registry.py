"""Releases in registry mode, with two worker agents (real processes, each with its own
engine) and a registry with a login: prebuilt images pinned to their digest, rollbacks
that pull again what retention removed, or answer at once where the image still is, and
an image gone from everywhere."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.credentials import RegistryCredentials
from agent.engine import Engine, PushProgress
from tests.support.cluster import start_cluster
from tests.support.contexts import busybox_context
from tests.support.dockerd import Dockerd
from tests.support.engine_proxy import altered
from tests.support.leader import InProcessLeader
from tests.support.registry import Registry
from tests.test_workers import TLS, WorkerFactory, _holds


async def _cluster(
    leader_factory: Callable[..., Any],
    registry: Registry,
    engines: list[Dockerd],
    worker_process: WorkerFactory,
    **leader: Any,
) -> InProcessLeader:
    made: InProcessLeader = await leader_factory(leader={**TLS, **leader})
    await start_cluster(made, registry, engines, worker_process)
    return made


async def _deploy(leader: InProcessLeader, ctx: Path, app: str) -> dict[str, Any]:
    dep = await leader.api.deploy_dir(ctx, app)
    final = await leader.api.wait_final(dep["id"])
    assert final["state"] == "succeeded", final
    await leader.api.wait_retention(dep["id"])
    return final


async def _rollback(leader: InProcessLeader, app: str, to: str) -> dict[str, Any]:
    status, doc = await leader.api.request("POST", f"/v1/apps/{app}/rollback", json={"to": to})
    assert status == 202, doc
    return await leader.api.wait_final(doc["id"])


async def _wait_gone(engines: list[Dockerd], image: str, timeout: float = 30) -> None:
    """Until no engine holds `image` (workers remove it on their own time)."""
    async with asyncio.timeout(timeout):
        while any(_holds(engine, image) for engine in engines):
            await asyncio.sleep(0.2)


async def _push(engine: Dockerd, registry: Registry, ctx: Path, repository: str, tag: str) -> str:
    """Build `ctx` on `engine` and push it as `repository:tag`, as a CI job would; the digest."""
    engine.cli("build", "-q", "-t", f"{repository}:{tag}", str(ctx))
    creds = RegistryCredentials(registry.host, registry.username, registry.password)

    async def ignore(_: PushProgress) -> None:
        return None

    client = Engine(engine.url, timeout=60)
    try:
        return await client.push(repository, tag, creds, ignore)
    finally:
        await client.close()


async def test_a_prebuilt_tag_is_pinned_to_its_digest_and_every_worker_holds_it(
    leader_factory: Callable[..., Any],
    registry: Registry,
    dockerd: Dockerd,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    tmp_path: Path,
) -> None:
    """An image a CI job pushed, deployed by tag: the deployment records the digest the
    tag named when it was accepted, skips building and pushing, and both workers hold
    that digest. The tag moving later changes nothing of it."""
    leader = await _cluster(leader_factory, registry, worker_engines, worker_process)
    repository = f"{registry.host}/{registry.username}/ci-built"
    digest = await _push(dockerd, registry, busybox_context(tmp_path / "a"), repository, "1.0")

    status, dep = await leader.api.request(
        "POST", "/v1/deployments", json={"app": "ci", "prebuilt": f"{repository}:1.0"}
    )
    assert status == 202, dep
    assert (dep["kind"], dep["digest"]) == ("prebuilt", digest)
    await _push(dockerd, registry, busybox_context(tmp_path / "b", cmd="echo 2"), repository, "1.0")
    final = await leader.api.wait_final(dep["id"])

    assert final["state"] == "succeeded", final
    assert final["image"] == f"{repository}@{digest}"
    assert list(final["stages"]) == ["distributing"]
    assert {n: r["status"] for n, r in final["nodes"].items()} == {"w1": "present", "w2": "present"}
    assert all(_holds(engine, final["image"]) for engine in worker_engines)


async def test_prebuilt_references_the_registry_cannot_serve_are_refused(
    leader_factory: Callable[..., Any],
    registry: Registry,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
) -> None:
    """An image on another registry host gets 400 with the hint; a tag the registry does
    not have gets 422 saying so; neither makes a deployment."""
    leader = await _cluster(leader_factory, registry, worker_engines, worker_process)
    cases = [
        ("ghcr.io/acme/web:1.0", 400, "ghcr.io"),
        (f"{registry.host}/{registry.username}/nothing:1.0", 422, "no tag"),
        (f"{registry.host}/{registry.username}/nothing@sha256:{'0' * 64}", 422, "no manifest"),
        (f"{registry.host}/{registry.username}/Bad:1.0", 400, "not a valid"),
    ]
    for ref, expected, said in cases:
        status, doc = await leader.api.request(
            "POST", "/v1/deployments", json={"app": "refused", "prebuilt": ref}
        )
        assert status == expected, (ref, doc)
        assert said in doc["error"]["message"], doc
    _, doc = await leader.api.request("POST", "/v1/deployments", json={"app": "r", "prebuilt": "x"})
    assert "classic 'image not found'" in doc["error"]["hint"]
    _, listed = await leader.api.request("GET", "/v1/deployments")
    assert listed["deployments"] == []


async def test_a_rollback_pulls_again_what_retention_removed_and_skips_what_is_held(
    leader_factory: Callable[..., Any],
    registry: Registry,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    tmp_path: Path,
) -> None:
    """keep_images = 2: once v3 is out, v1's image is gone from both workers (v2's and
    v3's stay). The history says where each image is. A rollback to v1 pulls it from the
    registry again on both, and retention then keeps v1 (current, though the oldest
    image) and v3, not v2; a rollback to v3, still held, is answered without a pull."""
    leader = await _cluster(leader_factory, registry, worker_engines, worker_process, keep_images=2)
    v1, v2, v3 = [
        await _deploy(leader, busybox_context(tmp_path / f"c{i}", cmd=f"echo {i}"), "retro")
        for i in (1, 2, 3)
    ]
    await _wait_gone(worker_engines, v1["image"])
    assert all(_holds(e, v["image"]) for e in worker_engines for v in (v2, v3))
    _, doc = await leader.api.request("GET", "/v1/apps/retro")
    retained = {r["id"]: r["retained"] for r in doc["releases"]}
    assert retained[v1["id"]] == {
        "leader": False,
        "workers": {"w1": False, "w2": False},
        "registry": True,
    }
    assert retained[v3["id"]] == {
        "leader": True,
        "workers": {"w1": True, "w2": True},
        "registry": True,
    }

    back = await _rollback(leader, "retro", v1["id"])

    assert back["state"] == "succeeded", back
    assert list(back["stages"]) == ["distributing"]
    assert {n: r["status"] for n, r in back["nodes"].items()} == {"w1": "present", "w2": "present"}
    assert all(_holds(engine, v1["image"]) for engine in worker_engines)
    pulls = [e for e in await leader.api.events(back["id"]) if e["type"] == "pull"]
    assert {e["node"] for e in pulls} == {"w1", "w2"}
    await leader.api.wait_retention(back["id"])
    await _wait_gone(worker_engines, v2["image"])  # the last two releases are v1 and v3
    assert all(_holds(e, v["image"]) for e in worker_engines for v in (v1, v3))

    forth = await _rollback(leader, "retro", v3["id"])

    assert forth["state"] == "succeeded", forth
    assert {r["status"] for r in forth["nodes"].values()} == {"present"}
    assert not [e for e in await leader.api.events(forth["id"]) if e["type"] == "pull"]
    assert forth["stages"]["distributing"]["seconds"] < 2


async def test_a_rollback_to_an_image_gone_from_everywhere_fails_image_gone(
    leader_factory: Callable[..., Any],
    registry: Registry,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    tmp_path: Path,
) -> None:
    """v1's image is past keep_images on every engine and its manifest was deleted from
    the registry: the rollback fails with image_gone before distributing anything."""
    leader = await _cluster(leader_factory, registry, worker_engines, worker_process, keep_images=1)
    v1 = await _deploy(leader, busybox_context(tmp_path / "a"), "lost")
    await _deploy(leader, busybox_context(tmp_path / "b", cmd="echo 2"), "lost")
    await _wait_gone(worker_engines, v1["image"])
    registry.delete_manifest(f"{registry.username}/lost", v1["digest"])

    final = await _rollback(leader, "lost", v1["id"])

    assert final["state"] == "failed", final
    assert final["error"]["code"] == "image_gone"
    assert "registry no longer has it" in final["error"]["message"]
    assert final["stages"] == {}
    assert final["nodes"] == {}


async def test_a_prebuilt_image_the_workers_cannot_run_is_stopped_before_distribution(
    leader_factory: Callable[..., Any],
    registry: Registry,
    dockerd: Dockerd,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    tmp_path: Path,
) -> None:
    """An amd64 image built elsewhere, for a worker whose engine reports arm64: the
    registry's manifest names the platform, and the deployment fails with
    platform_mismatch, naming the worker, before any pull is ordered."""
    repository = f"{registry.host}/{registry.username}/foreign"
    await _push(dockerd, registry, busybox_context(tmp_path / "a"), repository, "1")
    async with altered(worker_engines[0].sock, arch="arm64") as arm64:
        leader: InProcessLeader = await leader_factory(leader=TLS)
        await start_cluster(leader, registry, [arm64], worker_process)
        status, dep = await leader.api.request(
            "POST", "/v1/deployments", json={"app": "foreign", "prebuilt": f"{repository}:1"}
        )
        assert status == 202, dep
        final = await leader.api.wait_final(dep["id"])

    assert final["platform"] == "linux/amd64"
    assert final["error"]["code"] == "platform_mismatch", final["error"]
    assert "w1 (arm64)" in final["error"]["message"]
    assert final["stages"] == {} and final["nodes"] == {}
