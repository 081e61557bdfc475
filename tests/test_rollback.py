"""Releases and rollbacks on one leader (local mode) and a real single-node Swarm: the
history, a rollback that redeploys an earlier release's image and services without a
build, its place in the app's queue, a crash in its middle, an image that is gone, and
prebuilt images from the leader's engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.contexts import busybox_context, run_step
from tests.support.dockerd import Dockerd
from tests.support.leader import InProcessLeader, LeaderProcess
from tests.test_release import _service_image, _tasks
from tests.test_webhooks import SECRET, Receiver

SLEEP = ["/bin/busybox", "sh", "-c", "trap 'exit 0' TERM; /bin/busybox sleep 3600 & wait"]
RELEASE = {"stage_timeouts": {"releasing": 90}}
FINAL = {"succeeded", "failed", "cancelled"}


def _service(name: str, replicas: int = 1, monitor_s: float = 1) -> dict[str, Any]:
    return {
        "name": name,
        "command": SLEEP,
        "replicas": replicas,
        "update": {"monitor_s": monitor_s},
    }


async def _deploy(
    leader: InProcessLeader | LeaderProcess,
    ctx: Path,
    app: str,
    services: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    params = {k: str(v).lower() for k, v in extra.items()}
    if services is not None:
        params["services"] = json.dumps(services)
    dep = await leader.api.deploy_dir(ctx, app, **params)
    final = await leader.api.wait_final(dep["id"], timeout=110)
    assert final["state"] == "succeeded", final
    return final


async def _rollback(
    leader: InProcessLeader | LeaderProcess, app: str, **body: str
) -> tuple[int, dict[str, Any]]:
    status, doc = await leader.api.request("POST", f"/v1/apps/{app}/rollback", json=body)
    return status, doc


async def _rolled_back(
    leader: InProcessLeader | LeaderProcess, app: str, **body: str
) -> dict[str, Any]:
    status, doc = await _rollback(leader, app, **body)
    assert status == 202, doc
    return await leader.api.wait_final(doc["id"], timeout=110)


def _running_images(engine: Dockerd, service: str) -> list[str]:
    return sorted(image for image, state in _tasks(engine, service) if state == "Running")


async def test_apps_and_history_list_releases_newest_first_and_where_each_image_is(
    leader: InProcessLeader, dockerd: Dockerd, tmp_path: Path
) -> None:
    """Releases are the succeeded deployments, newest first, the newest current; a failed
    deployment is none. The leader's engine holds each image; no registry, no worker."""
    first = await _deploy(leader, busybox_context(tmp_path / "a"), "listed")
    second = await _deploy(leader, busybox_context(tmp_path / "b", cmd="echo 2"), "listed")
    broken = await leader.api.deploy_dir(
        busybox_context(tmp_path / "c", run_step("exit 3")), "listed"
    )
    assert (await leader.api.wait_final(broken["id"]))["state"] == "failed"

    status, apps = await leader.api.request("GET", "/v1/apps")
    assert status == 200
    (app,) = [a for a in apps["apps"] if a["app"] == "listed"]
    assert app["state"] == "failed"  # its newest deployment's
    assert app["latest"]["id"] == broken["id"]
    assert app["current"]["id"] == second["id"]
    assert app["current"]["image"] == second["image"]

    status, doc = await leader.api.request("GET", "/v1/apps/listed")
    assert status == 200
    assert doc["current"] == second["id"]
    releases = doc["releases"]
    assert [r["id"] for r in releases] == [second["id"], first["id"]]
    assert [r["current"] for r in releases] == [True, False]
    assert releases[1]["image"] == first["image"] and releases[1]["kind"] == "build"
    assert releases[0]["retained"] == {"leader": True, "workers": {}, "registry": None}

    dockerd.cli("image", "rm", "-f", first["image"])
    _, doc = await leader.api.request("GET", "/v1/apps/listed")
    assert doc["releases"][1]["retained"]["leader"] is False
    status, missing = await leader.api.request("GET", "/v1/apps/never-deployed")
    assert status == 404, missing


async def test_a_rollback_redeploys_the_previous_release_without_building(
    leader_factory: Callable[..., Any], swarm_engine: Dockerd, tmp_path: Path
) -> None:
    """Rolled back from v2, the service runs v1's image again; the rollback is a
    deployment of its own, of kind rollback, that went through `releasing` alone, whose
    events, webhooks and metrics say its kind, and which is now the current release."""
    receiver = Receiver()
    await receiver.start()
    try:
        leader = await leader_factory(
            engine={"url": swarm_engine.url},
            leader={**RELEASE, "webhooks": [{"url": receiver.url, "secret": SECRET}]},
        )
        services = [_service("web", replicas=2)]
        v1 = await _deploy(leader, busybox_context(tmp_path / "a"), "back", services)
        v2 = await _deploy(leader, busybox_context(tmp_path / "b", cmd="echo 2"), "back", services)
        assert _service_image(swarm_engine, "back_web") == v2["image"]

        final = await _rolled_back(leader, "back")

        assert final["state"] == "succeeded", final
        assert (final["kind"], final["rollback_of"]) == ("rollback", v1["id"])
        assert final["source"] == {"type": "rollback", "of": v1["id"]}
        assert list(final["stages"]) == ["releasing"]
        assert final["image"] == v1["image"]
        assert _service_image(swarm_engine, "back_web") == v1["image"]
        assert _running_images(swarm_engine, "back_web") == [v1["image"]] * 2
        events = await leader.api.events(final["id"])
        states = [(e["state"], e["kind"]) for e in events if e["type"] == "state"]
        assert states == [(state, "rollback") for state in ("queued", "releasing", "succeeded")]
        assert not any(e["type"] in ("log", "push") for e in events)
        _, doc = await leader.api.request("GET", "/v1/apps/back")
        assert [r["id"] for r in doc["releases"]] == [final["id"], v2["id"], v1["id"]]
        assert doc["releases"][0]["rollback_of"] == v1["id"]

        await receiver.wait_for(9)
        hooks = [d for d in receiver.seen if d["deployment"] == final["id"]]
        assert {d["kind"] for d in hooks} == {"rollback"}
        assert {d["rollback_of"] for d in hooks} == {v1["id"]}
        builds = [d for d in receiver.seen if d["deployment"] == v2["id"]]
        assert {d["kind"] for d in builds} == {"build"}
        async with leader.api.session.get(
            leader.api.base_url + "/metrics",
            headers={"Authorization": f"Bearer {leader.api.token}"},
        ) as response:
            metrics = await response.text()
        assert (
            'deploy_agent_deployments_total{code="",kind="rollback",state="succeeded"} 1.0'
            in metrics
        )
    finally:
        await receiver.stop()


async def test_a_rollback_follows_the_targets_services_and_prunes_as_it_did(
    leader_factory: Callable[..., Any], swarm_engine: Dockerd, tmp_path: Path
) -> None:
    """v1 had web alone, with prune; v2 added jobs. Rolled back to v1, web runs v1 and
    jobs goes, as v1's own release would have removed it. Back to v2 (no prune), jobs
    is created again."""
    leader = await leader_factory(engine={"url": swarm_engine.url}, leader=RELEASE)
    v1 = await _deploy(
        leader, busybox_context(tmp_path / "a"), "shape", [_service("web")], prune=True
    )
    v2 = await _deploy(
        leader,
        busybox_context(tmp_path / "b", cmd="echo 2"),
        "shape",
        [_service("web"), _service("jobs")],
    )
    assert swarm_engine.cli("service", "inspect", "shape_jobs", check=False).returncode == 0

    back = await _rolled_back(leader, "shape", to=v1["id"])

    assert back["state"] == "succeeded", back
    assert back["services"] == ["web"]
    assert _service_image(swarm_engine, "shape_web") == v1["image"]
    assert swarm_engine.cli("service", "inspect", "shape_jobs", check=False).returncode != 0
    removed = [
        e["service"] for e in await leader.api.events(back["id"]) if e.get("action") == "removed"
    ]
    assert removed == ["shape_jobs"]

    forth = await _rolled_back(leader, "shape", to=v2["id"])

    assert forth["state"] == "succeeded", forth
    assert _service_image(swarm_engine, "shape_jobs") == v2["image"]
    assert _service_image(swarm_engine, "shape_web") == v2["image"]


async def test_a_rollback_waits_for_the_deployment_of_its_app_under_way(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """Submitted while a build of the same app runs, a rollback stays queued until that
    build has finished, then runs; its target is the release before the one current
    when it was accepted. A queued rollback can be cancelled like any deployment."""
    v1 = await _deploy(leader, busybox_context(tmp_path / "a"), "queue")
    v2 = await _deploy(leader, busybox_context(tmp_path / "b", cmd="echo 2"), "queue")
    slow = await leader.api.deploy_dir(
        busybox_context(tmp_path / "c", run_step("sleep 2")), "queue"
    )
    await leader.api.wait_state(slow["id"], "building")

    status, rollback = await _rollback(leader, "queue")
    status2, doomed = await _rollback(leader, "queue", to=v2["id"])
    assert (status, status2) == (202, 202), (rollback, doomed)
    assert rollback["rollback_of"] == v1["id"]
    await asyncio.sleep(0.5)
    _, waiting = await leader.api.request("GET", f"/v1/deployments/{rollback['id']}")
    status, cancelled = await leader.api.request("POST", f"/v1/deployments/{doomed['id']}/cancel")

    assert waiting["state"] == "queued"
    assert (status, cancelled["state"]) == (200, "cancelled")
    built = await leader.api.wait_final(slow["id"])
    final = await leader.api.wait_final(rollback["id"])
    assert (built["state"], final["state"]) == ("succeeded", "succeeded")
    assert final["created_at"] < built["finished_at"] <= final["updated_at"]
    _, doc = await leader.api.request("GET", "/v1/apps/queue")
    assert [r["id"] for r in doc["releases"][:2]] == [final["id"], built["id"]]
    assert doc["releases"][0]["image"] == v1["image"]


async def test_a_rollback_whose_image_retention_removed_fails_image_gone(
    leader_factory: Callable[..., Any], swarm_engine: Dockerd, tmp_path: Path
) -> None:
    """With keep_images = 1, v1's image goes once v3 is out (no service names it then).
    A rollback to v1 fails with image_gone before anything is released: the service
    still runs v3, and the rollback never reached `releasing`."""
    leader = await leader_factory(
        engine={"url": swarm_engine.url}, leader={**RELEASE, "keep_images": 1}
    )
    services = [_service("web")]
    finals = [
        await _deploy(
            leader, busybox_context(tmp_path / f"c{i}", cmd=f"echo {i}"), "gone", services
        )
        for i in range(3)
    ]
    await leader.api.wait_retention(finals[-1]["id"])
    _, doc = await leader.api.request("GET", "/v1/apps/gone")
    assert [r["retained"]["leader"] for r in doc["releases"]] == [True, True, False]

    final = await _rolled_back(leader, "gone", to=finals[0]["id"])

    assert final["state"] == "failed", final
    assert final["error"]["code"] == "image_gone"
    assert finals[0]["id"] in final["error"]["message"]
    assert "keep_images" in final["error"]["hint"]
    assert final["stages"] == {}
    assert _service_image(swarm_engine, "gone_web") == finals[2]["image"]


async def test_rollbacks_are_refused_when_there_is_nothing_to_go_back_to(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """No app, one release only, a target that is not a release of the app, or a body
    that is not a rollback: each refused, and no deployment made."""
    one = await _deploy(leader, busybox_context(tmp_path / "a"), "single")
    broken = await leader.api.deploy_dir(
        busybox_context(tmp_path / "b", run_step("exit 1")), "single"
    )
    await leader.api.wait_final(broken["id"])

    cases = [
        ("nobody", {}, 404),
        ("single", {}, 409),
        ("single", {"to": broken["id"]}, 409),
        ("other", {"to": one["id"]}, 404),
        ("single", {"to": one["id"], "force": True}, 400),
        ("Not_An_App", {}, 400),
    ]
    for app, body, expected in cases:
        status, doc = await leader.api.request("POST", f"/v1/apps/{app}/rollback", json=body)
        assert status == expected, (app, body, doc)
        assert doc["error"]["message"]
    _, listed = await leader.api.request("GET", "/v1/deployments", params={"app": "single"})
    assert len(listed["deployments"]) == 2


async def test_a_leader_killed_mid_rollback_resumes_it_to_one_final_state(
    leader_process: Callable[..., LeaderProcess], swarm_engine: Dockerd, tmp_path: Path
) -> None:
    """SIGKILL while a rollback's service update is under way: the next start resumes
    it, from the update already sent, to a single final state: succeeded, on v1."""
    leader = leader_process(engine={"url": swarm_engine.url}, leader=RELEASE)
    leader.start()
    services = [_service("web", replicas=2, monitor_s=2)]
    v1 = await _deploy(leader, busybox_context(tmp_path / "a"), "phoenix", services)
    await _deploy(leader, busybox_context(tmp_path / "b", cmd="echo 2"), "phoenix", services)
    status, rollback = await _rollback(leader, "phoenix")
    assert status == 202, rollback
    await leader.api.wait_state(rollback["id"], "releasing")
    await asyncio.sleep(1.5)  # the update is sent and under way

    leader.kill()
    leader.start()
    final = await leader.api.wait_final(rollback["id"], timeout=90)

    assert final["state"] == "succeeded", final
    assert final["attempts"] == 2
    events = await leader.api.events(rollback["id"])
    assert [e["state"] for e in events if e["type"] == "state" and e["state"] in FINAL] == [
        "succeeded"
    ]
    assert [e["type"] for e in events].count("resumed") == 1
    assert _service_image(swarm_engine, "phoenix_web") == v1["image"]
    assert _running_images(swarm_engine, "phoenix_web") == [v1["image"]] * 2


async def test_a_prebuilt_image_on_the_leaders_engine_is_released_as_it_is(
    leader_factory: Callable[..., Any], swarm_engine: Dockerd, tmp_path: Path
) -> None:
    """Local mode: an image built outside the agent, on the leader's engine, is released
    without a build (kind prebuilt, `releasing` alone); one the engine lacks is refused
    with 422; build fields with prebuilt are refused with 400."""
    leader = await leader_factory(engine={"url": swarm_engine.url}, leader=RELEASE)
    swarm_engine.cli("build", "-q", "-t", "outside:1.0", str(busybox_context(tmp_path / "c")))
    body = {"app": "outside", "prebuilt": "outside:1.0", "services": [_service("web")]}

    status, dep = await leader.api.request("POST", "/v1/deployments", json=body)
    assert status == 202, dep
    final = await leader.api.wait_final(dep["id"], timeout=60)

    assert final["state"] == "succeeded", final
    assert (final["kind"], final["source"]) == (
        "prebuilt",
        {"type": "prebuilt", "ref": "outside:1.0"},
    )
    assert list(final["stages"]) == ["releasing"]
    assert _service_image(swarm_engine, "outside_web") == "outside:1.0"
    image_id = swarm_engine.cli("image", "inspect", "outside:1.0", "--format", "{{.Id}}")
    assert final["image_id"] == image_id.stdout.strip()

    status, doc = await leader.api.request(
        "POST", "/v1/deployments", json={"app": "outside", "prebuilt": "outside:2.0"}
    )
    assert status == 422, doc
    assert "outside:2.0" in doc["error"]["message"]
    status, doc = await leader.api.request(
        "POST",
        "/v1/deployments",
        json={"app": "outside", "prebuilt": "outside:1.0", "build_args": {"A": "1"}},
    )
    assert status == 400, doc
    assert "build_args" in doc["error"]["message"]
