"""Builds with BuildKit through the Engine API, on a real engine: the Dockerfile features
real apps use, the build log as steps, and what needs a client session.

The leaders here build on the session's engine (Engine 20.10, started with
--bridge=none, so leader.build_network is "host" as tests/support/leader.py sets it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.contexts import busybox_context, features_context, run_step
from tests.support.dockerd import Dockerd
from tests.support.leader import InProcessLeader

LeaderFactory = Callable[..., Any]


def _run(engine: Dockerd, image: str, *command: str) -> str:
    return engine.cli("run", "--rm", "--network", "none", image, *command).stdout


def _steps(events: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Each build step's events, by step number."""
    steps: dict[int, list[dict[str, Any]]] = {}
    for event in events:
        if event["type"] == "step":
            steps.setdefault(event["step"], []).append(event)
    return steps


def _step_named(events: list[dict[str, Any]], part: str) -> int:
    (number,) = {e["step"] for e in events if e["type"] == "step" and part in e["name"]}
    return int(number)


def _output(events: list[dict[str, Any]], step: int) -> list[str]:
    return [e["line"] for e in events if e["type"] == "log" and e.get("step") == step]


async def test_every_feature_builds_and_the_log_has_each_step(
    leader: InProcessLeader, dockerd: Dockerd, tmp_path: Path
) -> None:
    """A Dockerfile with independent stages, a build argument, COPY --chmod, COPY --link
    and a cache mount builds with BuildKit; the image holds what each step made; the
    event stream names each step, its output and its time, and the two independent
    stages run at the same time (both started before either is done)."""
    context = features_context(tmp_path / "c", cache_id=f"feat-{os.urandom(4).hex()}")
    dep = await leader.api.deploy_dir(context, "features", build_arg="GREETING=bonjour")
    final = await leader.api.wait_final(dep["id"])
    events = await leader.api.events(dep["id"])

    assert final["state"] == "succeeded", final["error"]
    (build,) = [e for e in events if e["type"] == "build"]
    assert build["builder"] == "buildkit"
    image = final["image"]
    assert _run(dockerd, image).strip() == "bonjour"
    assert _run(dockerd, image, "/bin/busybox", "cat", "/left", "/right", "/data.txt") == (
        "left\nright\nlinked data\n"
    )
    mode = _run(dockerd, image, "/bin/busybox", "stat", "-c", "%a", "/tool.sh").strip()
    assert mode == "750"

    left, right = _step_named(events, "[left "), _step_named(events, "[right ")
    steps = _steps(events)
    assert [e["status"] for e in steps[left]] == ["running", "done"]
    assert steps[left][-1]["seconds"] >= 2.0
    assert "left-start" in _output(events, left)
    order = [(e["step"], e["status"]) for e in events if e["type"] == "step"]
    last_start = max(order.index((left, "running")), order.index((right, "running")))
    first_end = min(order.index((left, "done")), order.index((right, "done")))
    assert last_start < first_end, order
    cached_run = _step_named(events, "--mount=type=cache")
    assert "greeting=bonjour" in _output(events, cached_run)


async def test_the_cache_mount_survives_between_deployments_of_the_app(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """The second deployment's RUN step (run again: its context differs) finds in its
    cache mount what the first one's left there."""
    cache_id = f"survive-{os.urandom(4).hex()}"
    counts = []
    for attempt in range(2):
        context = features_context(tmp_path / f"c{attempt}", cache_id=cache_id)
        dep = await leader.api.deploy_dir(context, "cachemount")
        final = await leader.api.wait_final(dep["id"])
        assert final["state"] == "succeeded", final["error"]
        events = await leader.api.events(dep["id"])
        lines = _output(events, _step_named(events, "--mount=type=cache"))
        counts += [line for line in lines if line.startswith("runs-before=")]

    assert counts == ["runs-before=0", "runs-before=1"]


async def test_target_builds_the_named_stage(
    leader: InProcessLeader, dockerd: Dockerd, tmp_path: Path
) -> None:
    """`target` builds that stage, not the last one, and the stages it does not need are
    not built at all."""
    context = features_context(tmp_path / "c", cache_id=f"target-{os.urandom(4).hex()}")
    dep = await leader.api.deploy_dir(context, "targeted", target="test")
    final = await leader.api.wait_final(dep["id"])
    events = await leader.api.events(dep["id"])

    assert final["state"] == "succeeded", final["error"]
    assert _run(dockerd, final["image"]).strip() == "tested"
    names = " ".join(e["name"] for e in events if e["type"] == "step")
    assert "[left " not in names
    assert "--mount=type=cache" not in names


async def test_a_rebuild_of_the_same_context_is_all_cached(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """The same context again: every Dockerfile step (`[n/m] …`) ends CACHED."""
    context = busybox_context(tmp_path / "c", run_step("echo once"))
    for _ in range(2):
        dep = await leader.api.deploy_dir(context, "recached")
        assert (await leader.api.wait_final(dep["id"]))["state"] == "succeeded"
    events = await leader.api.events(dep["id"])

    endings = {
        e["name"]: e["status"]
        for e in events
        if e["type"] == "step" and e["status"] != "running" and re.match(r"\[\d+/\d+\]", e["name"])
    }
    assert endings, events
    assert set(endings.values()) == {"cached"}, endings


async def test_a_failing_step_names_itself_with_its_output_and_error(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """A RUN that fails: build_failed, and the log's tail has the step's name, its
    output and its error, as buildx's plain progress shows them."""
    context = busybox_context(tmp_path / "c", run_step("echo about to fail; exit 3"))
    dep = await leader.api.deploy_dir(context, "failing")
    final = await leader.api.wait_final(dep["id"])
    events = await leader.api.events(dep["id"])

    assert final["state"] == "failed"
    assert final["error"]["code"] == "build_failed"
    step = _step_named(events, "exit 3")
    tail = final["error"]["log_tail"]
    assert f"#{step} about to fail" in tail
    assert any(line.startswith(f"#{step} ERROR: ") and "exit code: 3" in line for line in tail)
    assert _steps(events)[step][-1]["status"] == "error"


@pytest.mark.parametrize("mount", ["type=secret,id=token", "type=ssh"])
async def test_mounts_that_need_a_client_session_fail_with_a_hint(
    leader: InProcessLeader, tmp_path: Path, mount: str
) -> None:
    """--mount=type=secret and type=ssh need a client session the Engine API has not:
    build_failed, with a hint that says so."""
    step = f'RUN --mount={mount} ["/bin/busybox", "sh", "-c", "echo never"]'
    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c", step), "sessionless")
    final = await leader.api.wait_final(dep["id"])

    assert final["state"] == "failed"
    assert final["error"]["code"] == "build_failed"
    assert "client session" in final["error"]["hint"]


async def test_a_build_without_a_bridge_network_says_which_setting_to_change(
    leader_factory: LeaderFactory, tmp_path: Path
) -> None:
    """On an engine without its default bridge (--bridge=none, as the tests' engines),
    RUN steps on the default network fail: the hint names leader.build_network."""
    leader = await leader_factory(leader={"build_network": "default"})
    context = busybox_context(tmp_path / "c", run_step("echo networked"))
    dep = await leader.api.deploy_dir(context, "bridgeless")
    final = await leader.api.wait_final(dep["id"])

    assert final["error"]["code"] == "build_failed"
    assert "leader.build_network" in final["error"]["hint"]


async def test_the_classic_builder_when_the_config_says_so(
    leader_factory: LeaderFactory, tmp_path: Path
) -> None:
    """leader.builder = "classic": GET /v1/cluster says so, plain Dockerfiles build with
    its log lines, and a cache mount fails as the classic builder refuses it."""
    leader = await leader_factory(leader={"builder": "classic"})
    _, cluster = await leader.api.request("GET", "/v1/cluster")
    plain = busybox_context(tmp_path / "plain", run_step("echo classic-output"))
    dep = await leader.api.deploy_dir(plain, "classic")
    final = await leader.api.wait_final(dep["id"])
    events = await leader.api.events(dep["id"])
    mounted = busybox_context(
        tmp_path / "mounted", 'RUN --mount=type=cache,target=/c ["/bin/busybox", "true"]'
    )
    refused = await leader.api.wait_final((await leader.api.deploy_dir(mounted, "classic"))["id"])

    assert cluster["builder"]["builder"] == "classic"
    assert "leader.builder" in cluster["builder"]["reason"]
    assert final["state"] == "succeeded", final["error"]
    assert any("classic-output" in e["line"] for e in events if e["type"] == "log")
    assert not [e for e in events if e["type"] == "step"]
    assert refused["error"]["code"] == "build_failed"
    assert "requires BuildKit" in refused["error"]["message"]


async def test_the_cluster_says_buildkit_is_in_use_and_why(leader: InProcessLeader) -> None:
    """GET /v1/cluster names the builder, the reason and the engine it builds on."""
    status, cluster = await leader.api.request("GET", "/v1/cluster")

    assert status == 200
    assert cluster["builder"]["builder"] == "buildkit"
    assert "has BuildKit" in cluster["builder"]["reason"]
    assert cluster["builder"]["where"] == "the leader's engine"
