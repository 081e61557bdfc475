"""Release on a real single-node Swarm: services converge on the new image, a failing
image is rolled back and counted as a failure, dropped services can be pruned."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.cli.output import event_line
from agent.leader.state.models import NodeRecord
from tests.support.contexts import busybox_context
from tests.support.dockerd import Dockerd
from tests.support.engine_proxy import refusing
from tests.support.leader import InProcessLeader, LeaderProcess
from tests.support.registry import Registry

# a service that stops at once on SIGTERM, as a real app does (a bare `sleep` as PID 1
# ignores it and holds its old image for the whole stop grace period)
SLEEP = ["/bin/busybox", "sh", "-c", "trap 'exit 0' TERM; /bin/busybox sleep 3600 & wait"]
FAST = {"monitor_s": 1}
RELEASE = {"stage_timeouts": {"releasing": 90}}


def _service(name: str, command: list[str] = SLEEP, replicas: int = 2) -> dict[str, Any]:
    return {"name": name, "command": command, "replicas": replicas, "update": FAST}


async def _release(
    leader: InProcessLeader | LeaderProcess,
    ctx: Path,
    app: str,
    services: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    params = {"services": json.dumps(services), **{k: str(v).lower() for k, v in extra.items()}}
    dep = await leader.api.deploy_dir(ctx, app, **params)
    return await leader.api.wait_final(dep["id"], timeout=110)


def _tasks(engine: Dockerd, service: str) -> list[tuple[str, str]]:
    """(image, state) of each task Swarm wants running."""
    out = engine.cli(
        "service",
        "ps",
        service,
        "--filter",
        "desired-state=running",
        "--format",
        "{{.Image}} {{.CurrentState}}",
    ).stdout
    return [(line.split()[0], line.split()[1]) for line in out.splitlines()]


def _service_image(engine: Dockerd, service: str) -> str:
    return engine.cli(
        "service", "inspect", service, "--format", "{{.Spec.TaskTemplate.ContainerSpec.Image}}"
    ).stdout.strip()


async def test_two_services_converge_on_the_new_image(
    leader_factory: Callable[..., Any], swarm_engine: Dockerd, tmp_path: Path
) -> None:
    """Two services of two replicas each run the deployment's image when it succeeds."""
    leader = await leader_factory(engine={"url": swarm_engine.url}, leader=RELEASE)
    services = [_service("web"), _service("jobs")]

    final = await _release(leader, busybox_context(tmp_path / "c"), "shop", services)

    assert final["state"] == "succeeded", final
    assert final["services"] == ["web", "jobs"]
    for name in ("shop_web", "shop_jobs"):
        assert _service_image(swarm_engine, name) == final["image"]
        assert _tasks(swarm_engine, name) == [(final["image"], "Running")] * 2
    events = await leader.api.events(final["id"])
    counts = [
        (e["running"], e["desired"])
        for e in events
        if e.get("service") == "shop_web" and "running" in e
    ]
    assert counts[-1] == (2, 2)


async def test_failing_image_is_rolled_back_and_the_old_version_keeps_running(
    leader_factory: Callable[..., Any], swarm_engine: Dockerd, tmp_path: Path
) -> None:
    """A command that exits at once is rolled_back, naming the service; v1 still runs."""
    leader = await leader_factory(engine={"url": swarm_engine.url}, leader=RELEASE)
    first = await _release(leader, busybox_context(tmp_path / "a"), "flaky", [_service("api")])
    assert first["state"] == "succeeded", first

    second = await _release(
        leader,
        busybox_context(tmp_path / "b", cmd="echo v2"),
        "flaky",
        [_service("api", command=["/bin/busybox", "true"])],
    )

    assert second["state"] == "failed", second
    assert second["error"]["code"] == "rolled_back"
    assert "flaky_api" in second["error"]["message"]
    assert _service_image(swarm_engine, "flaky_api") == first["image"]
    assert _tasks(swarm_engine, "flaky_api") == [(first["image"], "Running")] * 2
    # the rollback's progress counts what serves meanwhile: the previous version's tasks
    events = await leader.api.events(second["id"])
    rollback = [e for e in events if str(e.get("update_state")).startswith("rollback")]
    assert rollback, [e for e in events if e["type"] == "release"]
    assert all(isinstance(e["others_running"], int) for e in rollback), rollback
    line = event_line(rollback[0]) or ""
    assert "back to the previous version" in line, line
    assert f"{rollback[0]['others_running']} task(s) of the previous version running" in line


async def test_a_failed_first_release_removes_the_services_it_created(
    leader_factory: Callable[..., Any], swarm_engine: Dockerd, tmp_path: Path
) -> None:
    """A new app whose second service keeps failing leaves no service behind: the one
    that did start goes too, as there was no earlier version to return to."""
    leader = await leader_factory(engine={"url": swarm_engine.url}, leader=RELEASE)
    services = [_service("web"), _service("broken", command=["/bin/busybox", "false"])]

    final = await _release(leader, busybox_context(tmp_path / "c"), "fresh", services)

    assert final["state"] == "failed", final
    assert "fresh_broken" in final["error"]["message"]
    left = swarm_engine.cli("service", "ls", "--filter", "label=deploy-agent.app=fresh", "-q")
    assert left.stdout.split() == []
    removed = [
        e["service"] for e in await leader.api.events(final["id"]) if e.get("action") == "removed"
    ]
    assert sorted(removed) == ["fresh_broken", "fresh_web"]


async def test_a_release_past_its_deadline_removes_the_services_it_created(
    leader_factory: Callable[..., Any], swarm_engine: Dockerd, tmp_path: Path
) -> None:
    """A new service whose health check never passes is still starting when the stage's
    deadline ends the deployment: it fails as a timeout and leaves no service behind."""
    leader = await leader_factory(
        engine={"url": swarm_engine.url}, leader={"stage_timeouts": {"releasing": 6}}
    )
    never_healthy = {
        **_service("sick", replicas=1),
        "health": {
            "test": ["CMD", "/bin/busybox", "false"],
            "interval_s": 60,
            "start_period_s": 60,
        },
    }

    final = await _release(leader, busybox_context(tmp_path / "c"), "late", [never_healthy])

    assert final["state"] == "failed", final
    assert final["error"]["code"] == "timeout"
    left = swarm_engine.cli("service", "ls", "--filter", "label=deploy-agent.app=late", "-q")
    assert left.stdout.split() == []
    removed = [
        e["service"] for e in await leader.api.events(final["id"]) if e.get("action") == "removed"
    ]
    assert removed == ["late_sick"]


async def test_a_release_resumed_after_a_crash_rolls_back_to_the_version_before_it(
    leader_process: Callable[..., LeaderProcess], swarm_engine: Dockerd, tmp_path: Path
) -> None:
    """SIGKILL while the update of a running service is under way: after the restart the
    release goes on from the update already sent, and when it fails (here: its stage
    deadline, the new version never healthy) the service returns to the version that ran
    before the deployment, not to the failed one."""
    leader = leader_process(
        engine={"url": swarm_engine.url}, leader={"stage_timeouts": {"releasing": 8}}
    )
    leader.start()
    before = await _release(leader, busybox_context(tmp_path / "c1"), "again", [_service("web")])
    assert before["state"] == "succeeded", before
    never_healthy = {
        **_service("web"),
        "health": {
            "test": ["CMD", "/bin/busybox", "false"],
            "interval_s": 60,
            "start_period_s": 60,
        },
    }
    params = {"services": json.dumps([never_healthy])}
    dep = await leader.api.deploy_dir(
        busybox_context(tmp_path / "c2", cmd="echo 2"), "again", **params
    )
    await leader.api.wait_state(dep["id"], "releasing")
    await asyncio.sleep(1.5)  # the update is sent and under way

    leader.kill()
    leader.start()
    final = await leader.api.wait_final(dep["id"], timeout=60)

    assert final["state"] == "failed", final
    assert final["attempts"] == 2
    assert _service_image(swarm_engine, "again_web").startswith(before["image"])
    actions = [e.get("action") for e in await leader.api.events(dep["id"])]
    assert "applied_already" in actions


async def test_local_mode_release_sends_no_registry_request(
    leader_factory: Callable[..., Any], swarm_engine: Dockerd, registry: Registry, tmp_path: Path
) -> None:
    """Released in local mode, the service runs the local tag and the registry sees nothing."""
    leader = await leader_factory(engine={"url": swarm_engine.url}, leader=RELEASE)
    await leader.api.put_registry(registry.host, registry.username, registry.password)
    await leader.api.request("DELETE", "/v1/registry")
    before = registry.request_count()

    final = await _release(
        leader, busybox_context(tmp_path / "c"), "solo", [_service("one", replicas=1)]
    )

    assert final["state"] == "succeeded", final
    assert final["mode"] == "local"
    assert _service_image(swarm_engine, "solo_one") == f"solo:{final['id']}"
    assert registry.request_count() == before


async def test_prune_removes_a_dropped_service(
    leader_factory: Callable[..., Any], swarm_engine: Dockerd, tmp_path: Path
) -> None:
    """With prune, a service no longer listed is removed; without it, it stays."""
    leader = await leader_factory(engine={"url": swarm_engine.url}, leader=RELEASE)
    ctx = busybox_context(tmp_path / "c")
    await _release(leader, ctx, "tidy", [_service("a", replicas=1), _service("b", replicas=1)])
    kept = await _release(leader, ctx, "tidy", [_service("a", replicas=1)])
    assert kept["state"] == "succeeded"
    assert swarm_engine.cli("service", "inspect", "tidy_b", check=False).returncode == 0

    pruned = await _release(leader, ctx, "tidy", [_service("a", replicas=1)], prune=True)

    assert pruned["state"] == "succeeded", pruned
    assert swarm_engine.cli("service", "inspect", "tidy_b", check=False).returncode != 0
    assert swarm_engine.cli("service", "inspect", "tidy_a", check=False).returncode == 0


async def test_engine_that_is_not_a_manager_fails_the_release(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """On an engine outside any Swarm, a release fails as release_failed saying so."""
    final = await _release(leader, busybox_context(tmp_path / "c"), "nowhere", [_service("x")])

    assert final["error"]["code"] == "release_failed"
    assert "not a Swarm manager" in final["error"]["message"]
    assert "swarm_init" in final["error"]["hint"]


async def test_swarm_init_makes_the_leaders_engine_a_manager(
    leader_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """With leader.swarm_init, a fresh engine becomes a single-node Swarm and releases work."""
    engine = Dockerd()
    engine.start()
    try:
        leader = await leader_factory(
            engine={"url": engine.url},
            leader={
                **RELEASE,
                "swarm_init": True,
                "swarm_advertise_addr": "127.0.0.2",
                "swarm_listen_addr": "127.0.0.2:2377",
            },
        )
        state = engine.cli("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()
        assert state == "active"
        final = await _release(
            leader, busybox_context(tmp_path / "c"), "fresh", [_service("s", replicas=1)]
        )
        assert final["state"] == "succeeded", final
        await leader.stop()
    finally:
        engine.leave_swarm(remove_bridge=False)  # the session's Swarm engine shares it
        engine.stop()


async def test_old_images_beyond_keep_images_are_removed(
    leader_factory: Callable[..., Any], swarm_engine: Dockerd, tmp_path: Path
) -> None:
    """With keep_images = 2, after three releases only the two newest images remain."""
    leader = await leader_factory(
        engine={"url": swarm_engine.url}, leader={**RELEASE, "keep_images": 2}
    )
    finals = []
    for i in range(3):
        ctx = busybox_context(tmp_path / f"c{i}", cmd=f"echo {i}")
        finals.append(await _release(leader, ctx, "keeper", [_service("s", replicas=1)]))
    assert all(f["state"] == "succeeded" for f in finals)
    await leader.api.wait_retention(finals[-1]["id"])

    held = swarm_engine.cli(
        "image", "ls", "--filter", "label=deploy-agent.app=keeper", "--format", "{{.Tag}}"
    ).stdout.split()
    assert sorted(held) == sorted(f["id"] for f in finals[1:])


async def test_an_image_a_service_still_names_is_kept_though_no_task_runs_it(
    leader_factory: Callable[..., Any], swarm_engine: Dockerd, tmp_path: Path
) -> None:
    """A service scaled to zero, left by releases that no longer list it, still names
    its image: retention keeps it past keep_images (a local image could not be pulled
    back), while the images nothing names go."""
    leader = await leader_factory(
        engine={"url": swarm_engine.url}, leader={**RELEASE, "keep_images": 1}
    )
    services = [_service("cron", replicas=0), _service("web", replicas=1)]
    first = await _release(leader, busybox_context(tmp_path / "c0"), "dormant", services)
    later = [
        await _release(leader, busybox_context(tmp_path / f"c{i}"), "dormant", services[1:])
        for i in (1, 2, 3)
    ]
    assert all(f["state"] == "succeeded" for f in (first, *later))
    await leader.api.wait_retention(later[-1]["id"])

    held = swarm_engine.cli(
        "image", "ls", "--filter", "label=deploy-agent.app=dormant", "--format", "{{.Tag}}"
    ).stdout.split()
    assert _service_image(swarm_engine, "dormant_cron") == first["image"]
    # cron's image, web's (and the one web would roll back to); not the one in between
    assert sorted(held) == sorted([first["id"], later[1]["id"], later[2]["id"]])


async def test_a_local_deployment_is_placed_where_its_image_is_though_a_worker_enrolled(
    leader_factory: Callable[..., Any], swarm_engine: Dockerd, tmp_path: Path
) -> None:
    """Accepted in local mode, a deployment whose release comes after a worker enrolled
    runs its service on the leader's own node, where its image is: not on workers,
    which cannot have an image that was never pushed, nor on any other node."""
    leader = await leader_factory(
        engine={"url": swarm_engine.url}, leader={"stage_timeouts": {"releasing": 20}}
    )
    services = json.dumps([_service("web", replicas=1)])
    dep = await leader.api.deploy_dir(
        busybox_context(tmp_path / "c"), "latecomer", services=services
    )
    assert leader.leader.ctx is not None
    node = NodeRecord(id="n-1", name="worker-1", enrolled_at=time.time())
    await leader.leader.ctx.store.add_node(node, "not-a-real-secret-hash")

    final = await leader.api.wait_final(dep["id"], timeout=60)

    assert (dep["mode"], final["state"]) == ("local", "succeeded"), final
    assert _tasks(swarm_engine, "latecomer_web") == [(final["image"], "Running")]
    node_id = swarm_engine.cli("info", "--format", "{{.Swarm.NodeID}}").stdout.strip()
    placement = swarm_engine.cli(
        "service", "inspect", "latecomer_web", "--format", "{{json .Spec.TaskTemplate.Placement}}"
    ).stdout
    assert json.loads(placement)["Constraints"] == [f"node.id == {node_id}"]


async def test_a_healthy_service_rolled_back_for_a_failing_sibling_keeps_serving(
    leader_factory: Callable[..., Any], swarm_engine: Dockerd, tmp_path: Path
) -> None:
    """v2 of web is healthy, v2 of api fails: Swarm rolls api back and the leader
    returns web to v1, in web's own update order (start-first), so web has a task
    running at every moment. Rolled back stop-first, it had none while v1 started."""
    leader = await leader_factory(engine={"url": swarm_engine.url}, leader=RELEASE)
    one = [_service("web", replicas=1), _service("api", replicas=1)]
    first = await _release(leader, busybox_context(tmp_path / "a"), "pair", one)
    assert first["state"] == "succeeded", first
    running: list[int] = []
    sampling = True

    def sample() -> None:
        while sampling:
            running.append(sum(state == "Running" for _, state in _tasks(swarm_engine, "pair_web")))
            time.sleep(0.05)

    sampler = asyncio.create_task(asyncio.to_thread(sample))
    try:
        failing = [_service("web", replicas=1), {**one[1], "command": ["/bin/busybox", "true"]}]
        second = await _release(
            leader, busybox_context(tmp_path / "b", cmd="echo v2"), "pair", failing
        )
        assert second["error"]["code"] == "rolled_back", second
        async with asyncio.timeout(60):
            while _tasks(swarm_engine, "pair_web") != [(first["image"], "Running")]:
                await asyncio.sleep(0.2)
    finally:
        sampling = False
        await sampler

    assert len(running) > 5
    assert min(running) >= 1, running


@pytest.fixture
async def refusing_deletes(swarm_engine: Dockerd) -> AsyncIterator[str]:
    """The Swarm engine, but every DELETE of a service answered 500 (set up before the
    leader, so it outlives the leader's stop)."""
    async with refusing(swarm_engine.sock, "DELETE", r"/services/") as url:
        yield url


async def test_a_prune_the_engine_refuses_leaves_the_live_release_succeeded(
    refusing_deletes: str,
    leader_factory: Callable[..., Any],
    swarm_engine: Dockerd,
    tmp_path: Path,
) -> None:
    """Every service runs the new version when the prune comes: a service that cannot be
    removed is an event and a warning, not a failed deployment the control plane would
    act on."""
    leader = await leader_factory(engine={"url": refusing_deletes}, leader=RELEASE)
    ctx = busybox_context(tmp_path / "c")
    both = [_service("a", replicas=1), _service("b", replicas=1)]
    made = await _release(leader, ctx, "stuck", both)
    assert made["state"] == "succeeded", made["error"]

    pruned = await _release(leader, ctx, "stuck", both[:1], prune=True)

    assert pruned["state"] == "succeeded", pruned
    events = await leader.api.events(pruned["id"])
    failed = [e for e in events if e.get("action") == "remove_failed"]
    assert [e["service"] for e in failed] == ["stuck_b"]
    assert "refused by the test's proxy" in failed[0]["error"]
    assert swarm_engine.cli("service", "inspect", "stuck_b", check=False).returncode == 0


@pytest.fixture
async def services_unavailable(swarm_engine: Dockerd) -> AsyncIterator[str]:
    """The Swarm manager, but its services list answered 503, as a manager that lost
    quorum or is locked (autolock, after a restart) answers."""
    async with refusing(swarm_engine.sock, "GET", r"/services$", status=503) as url:
        yield url


async def test_a_manager_that_cannot_list_its_services_has_no_image_removed(
    services_unavailable: str,
    leader_factory: Callable[..., Any],
    swarm_engine: Dockerd,
    tmp_path: Path,
) -> None:
    """Its services may name any of the app's images: none past keep_images goes until
    it answers (a 503 was taken for "not a manager", which has no services to ask)."""
    leader = await leader_factory(engine={"url": services_unavailable}, leader={"keep_images": 1})
    for i in range(3):
        dep = await leader.api.deploy_dir(busybox_context(tmp_path / f"c{i}"), "locked")
        assert (await leader.api.wait_final(dep["id"]))["state"] == "succeeded"
        (retention,) = await leader.api.wait_retention(dep["id"])
        if i:  # with one image only, nothing is past keep_images: nothing is asked
            assert "refused by the test's proxy" in retention["error"], retention

    held = swarm_engine.cli(
        "image", "ls", "--filter", "label=deploy-agent.app=locked", "--format", "{{.ID}}"
    ).stdout.split()
    assert len(held) == 3


@pytest.fixture
async def recorded(swarm_engine: Dockerd) -> AsyncIterator[tuple[str, list[Any]]]:
    """The Swarm engine behind a proxy that notes every request's method, path and
    headers (set up before the leader, so it outlives the leader's stop)."""
    requests: list[tuple[str, str, dict[str, str]]] = []
    async with refusing(swarm_engine.sock, seen=requests) as url:
        yield url, requests


async def test_services_are_released_without_registry_credentials(
    recorded: tuple[str, list[tuple[str, str, dict[str, str]]]],
    leader_factory: Callable[..., Any],
    swarm_engine: Dockerd,
    registry: Registry,
    tmp_path: Path,
) -> None:
    """Credentials sent with a service's create or update are kept by Swarm in the
    service's spec, on the managers' disks and in every worker's task store. None go:
    the nodes that may run its tasks hold the image by digest already. Empty ones go
    instead (an update that sends none keeps those the spec holds, which an earlier
    version of the leader, or an earlier release, put there)."""
    url, requests = recorded
    leader = await leader_factory(engine={"url": url}, leader=RELEASE)
    await leader.api.put_registry(registry.host, registry.username, registry.password)
    ctx = busybox_context(tmp_path / "c")
    for _ in range(2):  # a create, then an update
        final = await _release(leader, ctx, "private", [_service("web", replicas=1)])
        assert final["state"] == "succeeded", final["error"]

    assert _service_image(swarm_engine, "private_web") == final["image"]
    releases = [(m, p, h) for m, p, h in requests if m == "POST" and "/services/" in p]
    assert {p.rsplit("/", 1)[-1] for _, p, _ in releases} == {"create", "update"}
    sent = [base64.urlsafe_b64decode(h["X-Registry-Auth"]) for _, _, h in releases]
    assert sent == [b"{}"] * len(releases)
    pushes = [h for m, p, h in requests if m == "POST" and p.endswith("/push")]
    assert pushes and all("X-Registry-Auth" in h for h in pushes)  # the proxy sees headers
