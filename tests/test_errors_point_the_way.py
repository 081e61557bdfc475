"""Errors that point the right way: a build the engine failed is not blamed on the
Dockerfile, the leader's log says why a deployment failed and what to do, and a leader
whose API token every user of the host can read says so at start."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.leader.pipeline.building import DOCKERFILE_HINT, ENGINE_HINT, build_hint
from tests.support.contexts import busybox_context, run_step
from tests.support.dockerd import Dockerd
from tests.support.engine_proxy import Relay
from tests.support.leader import TOKEN

# What real engines (20.10) answered: a build whose network the engine lacks, and a
# RUN step that failed.
ENGINE_SAID = "network nosuchnet not found"
STEP_FAILED = "The command '/bin/busybox sh -c exit 1' returned a non-zero code: 1"


@pytest.mark.parametrize(
    ("message", "hint"),
    [
        (ENGINE_SAID, ENGINE_HINT),
        ("lost the engine mid-build: Server disconnected", ENGINE_HINT),
        ("failed to register layer: write /x: no space left on device", ENGINE_HINT),
        (STEP_FAILED, DOCKERFILE_HINT),
        ("COPY failed: file not found in build context", DOCKERFILE_HINT),
        ("dockerfile parse error line 2: unknown instruction: CPY", DOCKERFILE_HINT),
    ],
)
def test_a_build_failure_is_told_whose_fault_it_is(message: str, hint: str) -> None:
    """The engine's and the host's failures get the engine's hint; the Dockerfile's own
    failures get the Dockerfile's."""
    assert build_hint(message) == hint


async def test_an_engine_lost_mid_build_is_not_blamed_on_the_dockerfile(
    dockerd: Dockerd, leader_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A build whose engine connection is cut under it fails with build_failed and the
    engine's hint, and the leader logs deployment.finished with the message and the hint."""
    async with Relay(dockerd.sock, tmp_path) as relay:
        leader = await leader_factory(engine={"url": relay.url})
        context = busybox_context(tmp_path / "c", run_step("echo engine-lost-now; sleep 5"))
        with capture_logs() as logs:
            dep = await leader.api.deploy_dir(context, "doomed")
            await leader.api.wait_log_line(dep["id"], "engine-lost-now")
            relay.cut()
            final = await leader.api.wait_final(dep["id"], timeout=60)

    assert final["error"]["code"] == "build_failed", final
    assert final["error"]["hint"] == ENGINE_HINT, final
    finished = [e for e in logs if e["event"] == "deployment.finished"]
    assert finished and finished[-1]["message"] == final["error"]["message"], finished
    assert finished[-1]["hint"] == ENGINE_HINT


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o600, False)])
async def test_a_leader_whose_token_others_can_read_says_so(
    leader_factory: Callable[..., Any], tmp_path: Path, mode: int, warned: bool
) -> None:
    """At start, a leader whose API token file every user may read logs a warning that
    names the file and the fix; one readable by its owner alone does not."""
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(mode)

    with capture_logs() as logs:
        await leader_factory(leader={"api_token": None, "api_token_file": str(token_file)})

    found = [e for e in logs if e["event"] == "leader.api_token_readable"]
    assert bool(found) is warned, logs
    if warned:
        assert found[0]["file"] == str(token_file) and found[0]["mode"] == "0644"
        assert f"chmod 600 {token_file}" in found[0]["hint"]
