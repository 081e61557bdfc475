"""Housekeeping: a build that fails or is cancelled leaves no `<none>` image behind on the
engine, and removing registry credentials that were never set changes nothing."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.support.contexts import busybox_context, run_step
from tests.support.dockerd import Dockerd
from tests.support.leader import InProcessLeader

STEP_IMAGE = re.compile(r"^ ---> ([0-9a-f]{12,64})$")  # the classic builder's


def _step_images(events: list[dict[str, object]]) -> list[str]:
    """The image each finished step left, from the build log (` ---> 3f9c2d1a0b4e`)."""
    found = (STEP_IMAGE.match(str(e.get("line", "")).rstrip()) for e in events)
    return [m.group(1) for m in found if m]


def _exists(engine: Dockerd, image: str) -> bool:
    return engine.cli("image", "inspect", image, check=False).returncode == 0


def _dangling(engine: Dockerd) -> set[str]:
    listed = engine.cli("images", "--filter", "dangling=true", "--quiet", "--no-trunc")
    return set(listed.stdout.split())


@pytest.mark.parametrize("builder", ["classic", "buildkit"])
async def test_a_failed_build_leaves_no_dangling_image(
    leader_factory: Callable[..., Any], dockerd: Dockerd, tmp_path: Path, builder: str
) -> None:
    """A failed build leaves no `<none>` image: the classic builder's last finished step,
    untagged and used by nothing, is removed with the failure (it would otherwise stay
    for good, since no app's retention lists it); BuildKit leaves none to begin with."""
    leader = await leader_factory(leader={"builder": builder})
    before = _dangling(dockerd)
    context = busybox_context(
        tmp_path / "c", run_step("echo kept-for-nothing > /left"), run_step("exit 3")
    )
    dep = await leader.api.deploy_dir(context, "broken")
    final = await leader.api.wait_final(dep["id"])
    assert final["error"]["code"] == "build_failed", final

    assert _dangling(dockerd) - before == set()
    if builder == "classic":
        steps = _step_images(await leader.api.events(dep["id"]))
        assert steps, "the build log shows no step's image"
        assert not _exists(dockerd, steps[-1]), f"{steps[-1]} is still on the engine"


@pytest.mark.parametrize("builder", ["classic", "buildkit"])
async def test_a_cancelled_build_leaves_no_dangling_image(
    leader_factory: Callable[..., Any], dockerd: Dockerd, tmp_path: Path, builder: str
) -> None:
    """Cancelled mid-build, a deployment leaves none of its steps' images behind."""
    leader = await leader_factory(leader={"builder": builder})
    before = _dangling(dockerd)
    context = busybox_context(
        tmp_path / "c", run_step("echo before-the-cancel > /left"), run_step("sleep 30")
    )
    with capture_logs() as logs:
        dep = await leader.api.deploy_dir(context, "cancelled")
        # the step's start: a log line of the classic builder, a step event of BuildKit's
        started = lambda e: "sleep 30" in f"{e.get('line', '')}{e.get('name', '')}"  # noqa: E731
        await leader.api.first_event(dep["id"], started)
        status, _ = await leader.api.request("POST", f"/v1/deployments/{dep['id']}/cancel")
        assert status == 200
        final = await leader.api.wait_final(dep["id"])
    assert final["state"] == "cancelled", final

    said = [e for e in logs if str(e["event"]).startswith("retention.")]
    assert _dangling(dockerd) - before == set(), said
    if builder == "classic":
        steps = _step_images(await leader.api.events(dep["id"]))
        assert steps and not _exists(dockerd, steps[-1]), (steps, said)


async def test_removing_credentials_that_were_never_set_changes_nothing(
    leader: InProcessLeader,
) -> None:
    """DELETE /v1/registry with none set answers removed: false and keeps the version,
    so the workers get no new version to acknowledge; `registry remove` says so."""
    status, doc = await leader.api.request("DELETE", "/v1/registry")
    assert status == 200 and doc["removed"] is False and doc["version"] == 0, doc
    status, doc = await leader.api.request("DELETE", "/v1/registry")
    assert doc["version"] == 0, doc
    assert leader.leader.ctx is not None
    assert await leader.leader.ctx.store.credentials_version() == 0
