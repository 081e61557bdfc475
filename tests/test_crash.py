"""Crashes and restarts: every deployment reaches exactly one final state, none is lost,
and work whose result was recorded is not done again."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from agent.leader.state.models import Deployment, State
from tests.support.contexts import busybox_context, run_step
from tests.support.leader import InProcessLeader, LeaderProcess
from tests.support.registry import Registry

FINAL = {"succeeded", "failed", "cancelled"}


def _final_state_events(events: list[dict[str, Any]]) -> list[str]:
    return [e["state"] for e in events if e["type"] == "state" and e["state"] in FINAL]


async def _building_with_one_queued(
    leader: LeaderProcess, tmp_path: Path, app: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start `leader` with a slow build under way and a second deployment of the same
    app queued behind it; both deployments, once the first is building."""
    leader.start()
    slow = busybox_context(tmp_path / "a", run_step("echo started; sleep 3"))
    first = await leader.api.deploy_dir(slow, app)
    second = await leader.api.deploy_dir(busybox_context(tmp_path / "b"), app)
    await leader.api.wait_state(first["id"], "building")
    return first, second


async def test_sigkill_mid_build_then_restart_finishes_everything_once(
    leader_process: Callable[..., LeaderProcess], tmp_path: Path
) -> None:
    """SIGKILL mid-build: after restart the build resumes, the queued one runs, each ends once."""
    leader = leader_process()
    first, second = await _building_with_one_queued(leader, tmp_path, "crashy")
    await asyncio.sleep(1)

    leader.kill()
    leader.start()
    a = await leader.api.wait_final(first["id"])
    b = await leader.api.wait_final(second["id"])

    assert a["state"] == "succeeded", a
    assert a["attempts"] == 2
    assert b["state"] == "succeeded", b
    assert b["attempts"] == 1
    assert b["stages"]["building"]["started_at"] >= a["finished_at"]
    events = await leader.api.events(first["id"])
    assert _final_state_events(events) == ["succeeded"]
    assert [e["type"] for e in events].count("resumed") == 1


async def test_a_restart_sweeps_what_a_kill_left_on_disk_and_keeps_what_is_to_run(
    leader_process: Callable[..., LeaderProcess], tmp_path: Path
) -> None:
    """Killed with an upload cut short, a clone under way and a finished deployment's
    context not yet removed: the next start removes those, keeps the context of the
    deployment still queued, which then builds from it."""
    leader = leader_process()
    _, queued = await _building_with_one_queued(leader, tmp_path, "sweep")
    leader.kill()
    contexts = Path(leader.raw["state_dir"]) / "contexts"
    strays = [contexts / "upload-20260101000000-0000abcd.part", contexts / "clone-x1y2z3"]
    strays[0].write_bytes(b"half an upload")
    (strays[1] / "src").mkdir(parents=True)
    strays.append(contexts / "20260101000000-feedbeef.tar")  # a deployment since finished
    strays[2].write_bytes(b"done with")

    leader.start()
    final = await leader.api.wait_final(queued["id"])

    assert [p.name for p in strays if p.exists()] == []
    assert "contexts.swept" in leader.log_text()
    assert final["state"] == "succeeded", final


async def test_sigterm_drains_the_build_in_flight(
    leader_process: Callable[..., LeaderProcess], tmp_path: Path
) -> None:
    """SIGTERM lets a running build finish within the drain deadline, then exits 0; the
    API (and with it the worker links) stays up while it drains."""
    leader = leader_process()
    leader.start()
    dep = await leader.api.deploy_dir(
        busybox_context(tmp_path / "a", run_step("sleep 2")), "drained"
    )
    await leader.api.wait_state(dep["id"], "building")

    stopping = asyncio.create_task(asyncio.to_thread(leader.terminate))
    await asyncio.sleep(0.5)  # SIGTERM delivered, the build still running
    status, during = await leader.api.request("GET", f"/v1/deployments/{dep['id']}")
    code = await stopping

    assert status == 200 and during["state"] == "building"
    assert code == 0
    assert '"scheduler.draining"' in leader.log_text()
    leader.start()
    _, doc = await leader.api.request("GET", f"/v1/deployments/{dep['id']}")
    assert doc["state"] == "succeeded"
    assert doc["attempts"] == 1


async def test_drain_deadline_leaves_work_to_resume_after_restart(
    leader_process: Callable[..., LeaderProcess], tmp_path: Path
) -> None:
    """Work still running at the drain deadline is interrupted, and resumed by the next start."""
    leader = leader_process(leader={"drain_timeout": 1})
    leader.start()
    dep = await leader.api.deploy_dir(
        busybox_context(tmp_path / "a", run_step("sleep 4")), "interrupted"
    )
    await leader.api.wait_state(dep["id"], "building")

    assert await asyncio.to_thread(leader.terminate) == 0
    leader.start()
    final = await leader.api.wait_final(dep["id"])

    assert final["state"] == "succeeded"
    assert final["attempts"] == 2
    types = [e["type"] for e in await leader.api.events(dep["id"])]
    assert types.count("interrupted") == 1
    assert types.count("resumed") == 1


def _rewind_to_distributing(db_path: Path, dep_id: str) -> None:
    """Make the record look as a crash right after the push would leave it."""
    db = sqlite3.connect(db_path)
    (doc,) = db.execute("SELECT doc FROM deployments WHERE id = ?", (dep_id,)).fetchone()
    dep = msgspec.json.decode(doc, type=Deployment)
    dep.state, dep.finished_at, dep.error = State.DISTRIBUTING, None, None
    dep.stages[State.DISTRIBUTING].finished_at = None
    db.execute(
        "UPDATE deployments SET state = ?, doc = ? WHERE id = ?",
        (dep.state.value, msgspec.json.encode(dep), dep_id),
    )
    db.commit()
    db.close()


async def test_a_recorded_digest_is_not_pushed_again_after_a_crash(
    leader_factory: Callable[..., Any], registry: Registry, tmp_path: Path
) -> None:
    """Resumed after the push was recorded, a deployment finishes without a registry request."""
    first: InProcessLeader = await leader_factory()
    await first.api.put_registry(registry.host, registry.username, registry.password)
    dep = await first.api.deploy_dir(busybox_context(tmp_path / "a"), "pushed-once")
    done = await first.api.wait_final(dep["id"])
    await first.stop()
    _rewind_to_distributing(Path(first.config.state_dir) / "leader.db", dep["id"])
    requests_before = registry.request_count()

    second: InProcessLeader = await leader_factory(state_dir=first.config.state_dir)
    final = await second.api.wait_final(dep["id"])

    assert final["state"] == "succeeded"
    assert final["digest"] == done["digest"]
    assert final["attempts"] == 2
    assert registry.request_count() == requests_before
    events = await second.api.events(dep["id"])
    resumed_at = [e["type"] for e in events].index("resumed")
    assert not any(e["type"] == "push" for e in events[resumed_at:])
