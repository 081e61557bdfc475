"""The leader process SIGKILLed at random points of registry-mode deployments.

Each trial submits two deployments of one app, kills the leader after a random delay,
restarts it and waits. Required: every deployment ends in exactly one final state,
none is lost, and a digest recorded before the kill is never pushed again.
The CI suite runs 8 trials; DEPLOY_AGENT_KILL_TRIALS=100 runs the long mode.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.contexts import busybox_context, run_step
from tests.support.leader import LeaderProcess
from tests.support.registry import Registry

TRIALS = int(os.environ.get("DEPLOY_AGENT_KILL_TRIALS", "8"))
FINAL = {"succeeded", "failed", "cancelled"}


def _manifest_puts(registry: Registry, app: str, tag: str) -> int:
    pattern = re.compile(rf'"PUT /v2/[^ ]*/{app}/manifests/{tag} ')
    return len(pattern.findall(registry.log_path.read_text()))


@pytest.mark.timeout(60 + 10 * TRIALS)  # about 3 s a trial; slower when the machine is busy
async def test_random_sigkills_lose_nothing_and_never_push_twice(
    leader_process: Callable[..., LeaderProcess], registry: Registry, tmp_path: Path
) -> None:
    seed = int(os.environ.get("DEPLOY_AGENT_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    leader = leader_process(leader={"max_attempts": 10})
    leader.start()
    status, _ = await leader.api.put_registry(registry.host, registry.username, registry.password)
    assert status == 200
    # the kill may land between the registry taking a manifest and the leader recording it;
    # only a recorded digest is known to be pushed
    slow = busybox_context(tmp_path / "slow", run_step("sleep 1"))
    fast = busybox_context(tmp_path / "fast")
    outcomes = []
    repushed = 0
    for trial in range(TRIALS):
        ids = [(await leader.api.deploy_dir(ctx, "victim"))["id"] for ctx in (slow, fast)]
        await asyncio.sleep(rng.uniform(0, 2.5))
        recorded = await _recorded_digests(leader, ids)
        leader.kill()
        leader.start()
        for dep_id in ids:
            final = await leader.api.wait_final(dep_id, timeout=60)
            events = await leader.api.events(dep_id)
            finals = [e["state"] for e in events if e["type"] == "state" and e["state"] in FINAL]
            assert finals == [final["state"]], (seed, trial, dep_id, finals)
            assert final["state"] == "succeeded", (seed, trial, final)
            puts = _manifest_puts(registry, "victim", dep_id)
            if dep_id in recorded:  # pushed and recorded before the kill: never again
                assert final["digest"] == recorded[dep_id]
                assert puts == 1, (seed, trial, dep_id)
            else:  # a push in flight at the kill (the engine may finish it) is redone once
                assert 1 <= puts <= 2, (seed, trial, dep_id)
                repushed += puts - 1
            outcomes.append(final["attempts"])
    resumed = sum(1 for attempts in outcomes if attempts > 1)
    print(
        f"kill trials: {TRIALS}, seed {seed}, deployments {len(outcomes)}, "
        f"resumed after a kill {resumed}, each ended once (asserted), recorded digests "
        f"pushed again 0 (asserted), unrecorded in-flight pushes redone {repushed}"
    )


async def _recorded_digests(leader: LeaderProcess, ids: list[str]) -> dict[str, str]:
    found = {}
    for dep_id in ids:
        _, doc = await leader.api.request("GET", f"/v1/deployments/{dep_id}")
        if doc["digest"]:
            found[dep_id] = doc["digest"]
    return found
