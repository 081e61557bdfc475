"""The release's convergence watch against a scripted Swarm, so that the order in which
task states are seen is fixed: the real-Swarm tests in test_release.py cannot choose it.
And the runner's final write, against a cancel timed to land in its middle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

import pytest

from agent.errors import DeploymentError, EngineApiError
from agent.leader.pipeline import release
from agent.leader.pipeline.context import LeaderContext
from agent.leader.pipeline.runner import Runner
from agent.leader.state.models import (
    Deployment,
    DeploymentRequest,
    Mode,
    ServiceSpec,
    UpdateSettings,
)
from agent.retention import DEPLOYMENT_LABEL

IMAGE = "fresh:d1"


class ScriptedSwarm:
    """Answers the two calls the watch makes; `tasks` gives the task list at each poll."""

    def __init__(
        self, tasks: Sequence[Sequence[tuple[str, ...]]], update: str | None = None, refuse: int = 0
    ) -> None:
        self._tasks = tasks
        self._update = {"UpdateStatus": {"State": update}} if update else {}
        self.refuse = refuse  # answer this many polls with a 503 first
        self.polls = 0

    async def request(self, method: str, path: str, **_: Any) -> Any:
        if self.refuse:
            self.refuse -= 1
            raise EngineApiError(503, "rpc error: code = Unavailable desc = no leader")
        if path == "tasks":
            states = self._tasks[min(self.polls, len(self._tasks) - 1)]
            self.polls += 1
            return [_task(*task) for task in states]
        return {"ID": "s1", "Spec": {}, **self._update}


def _task(task_id: str, state: str, deployment: str = "d1") -> dict[str, Any]:
    """A task of the image IMAGE, made by `deployment` (the one watched is d1)."""
    return {
        "ID": task_id,
        "DesiredState": "running",
        "Spec": {"ContainerSpec": {"Image": IMAGE, "Labels": {DEPLOYMENT_LABEL: deployment}}},
        "Status": {"State": state, "Err": "task: non-zero exit (1)" if state == "failed" else ""},
    }


class Events:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    async def record(self, dep_id: str, event_type: str, **fields: Any) -> None:
        self.records.append(fields)


def _deployment(monitor_s: float) -> Deployment:
    svc = ServiceSpec(name="web", replicas=2, update=UpdateSettings(monitor_s=monitor_s))
    return Deployment(
        id="d1",
        app="fresh",
        mode=Mode.LOCAL,
        request=DeploymentRequest(app="fresh", services=[svc]),
        source="upload",
        created_at=time.time(),
        updated_at=time.time(),
        repository="fresh",
        tag="d1",
    )


def _context(swarm: ScriptedSwarm) -> LeaderContext:
    return cast(LeaderContext, SimpleNamespace(engine=swarm, journal=Events()))


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(release, "POLL_SECONDS", 0.02)


async def test_tasks_seen_running_once_then_failing_fail_the_release() -> None:
    """A command that exits at once is briefly running: seen so at the first poll, the
    new service is not yet converged, and its failing tasks then fail the release."""
    running = [("t1", "running"), ("t2", "running")]
    failing = [("t1", "failed"), ("t2", "failed"), ("t3", "failed"), ("t4", "starting")]
    swarm = ScriptedSwarm([running, failing])

    with pytest.raises(release.ServiceFailed) as caught:
        await release._converge(_context(swarm), _deployment(monitor_s=1.0))

    assert caught.value.service == "fresh_web"
    assert caught.value.code == "release_failed"
    assert "non-zero exit" in caught.value.message


async def test_tasks_that_stay_running_for_the_monitor_window_converge() -> None:
    """The same tasks running at every poll converge once the window has passed, not
    before it."""
    swarm = ScriptedSwarm([[("t1", "running"), ("t2", "running")]])
    started = time.monotonic()

    await release._converge(_context(swarm), _deployment(monitor_s=0.3))

    assert 0.3 <= time.monotonic() - started < 1.0
    assert swarm.polls > 1


async def test_a_replaced_task_starts_its_window_again() -> None:
    """A task that failed and was replaced does not inherit the window of the one before:
    convergence waits for the new task's own."""
    first = [("t1", "running"), ("t2", "running")]
    replaced = [("t1", "running"), ("t2", "failed"), ("t3", "running")]
    swarm = ScriptedSwarm([first] * 5 + [replaced])
    started = time.monotonic()

    await release._converge(_context(swarm), _deployment(monitor_s=0.3))

    # t3 was first seen at the sixth poll (about 0.1 s in) and needs its own 0.3 s
    assert time.monotonic() - started >= 0.35


async def test_an_update_swarm_completed_needs_no_second_window() -> None:
    """Swarm has already watched an update it calls completed for the monitor window:
    the leader does not wait a second one."""
    swarm = ScriptedSwarm([[("t1", "running"), ("t2", "running")]], update="completed")
    started = time.monotonic()

    await release._converge(_context(swarm), _deployment(monitor_s=5.0))

    assert time.monotonic() - started < 1.0
    assert swarm.polls == 1


async def test_an_earlier_deployment_of_the_same_image_counts_for_nothing() -> None:
    """Redeploying the digest that runs: the earlier deployment's running tasks, and its
    failed ones, are not this one's. The update Swarm completed last time does not make
    this one converge; the new tasks do, and the old failures fail nothing."""
    earlier: list[tuple[str, ...]] = [("t1", "running", "d0"), ("t2", "running", "d0")]
    earlier += [(f"f{i}", "failed", "d0") for i in range(release.FAILED_TASKS_LIMIT)]
    rolled_out = [("t3", "running"), ("t4", "running")]
    swarm = ScriptedSwarm([earlier] * 3 + [rolled_out], update="completed")

    await release._converge(_context(swarm), _deployment(monitor_s=5.0))

    assert swarm.polls == 4


async def test_a_few_refused_polls_do_not_fail_the_release() -> None:
    """A manager electing its leader refuses a few calls; the watch goes on through them."""
    swarm = ScriptedSwarm([[("t1", "running"), ("t2", "running")]], refuse=3)

    await release._converge(_context(swarm), _deployment(monitor_s=0.1))

    assert swarm.polls >= 1


async def test_an_engine_that_keeps_refusing_fails_the_release() -> None:
    """A run of refused polls is the release failing, with the engine's reason."""
    swarm = ScriptedSwarm([[("t1", "running")]], refuse=release.POLL_FAILURES_LIMIT)

    with pytest.raises(DeploymentError) as caught:
        await release._converge(_context(swarm), _deployment(monitor_s=0.1))

    assert caught.value.code == "release_failed"
    assert "no leader" in str(caught.value)


async def test_a_cancel_during_the_final_write_does_not_cut_it_short() -> None:
    """The final state is written to its end even when a cancel arrives during the write:
    a record left unfinished would be run again."""
    written: list[str] = []

    async def slow_write() -> None:
        await asyncio.sleep(0.2)
        written.append("succeeded")

    task = asyncio.create_task(Runner.settle(slow_write()))
    await asyncio.sleep(0.05)
    task.cancel()
    await task

    assert written == ["succeeded"]
    assert not task.cancelled()


@pytest.mark.parametrize(
    ("update", "code"),
    [("rollback_completed", "rolled_back"), ("rollback_paused", "release_failed")],
)
async def test_a_paused_rollback_is_not_reported_as_rolled_back(update: str, code: str) -> None:
    """Only a rollback Swarm completed is `rolled_back`; a paused one left the service on
    neither version and fails the release as such."""
    swarm = ScriptedSwarm([[("t1", "running")]], update=update)

    with pytest.raises(release.ServiceFailed) as caught:
        await release._converge(_context(swarm), _deployment(monitor_s=0.1))

    assert caught.value.code == code
