"""`deploy-agent run` runs on uvloop, or on asyncio's loop when the environment asks,
and refuses any other choice before it starts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.eventloop import LOOP_ENV
from tests.support.leader import LeaderProcess
from tests.support.procs import wait_until


def _started(leader: LeaderProcess) -> dict[str, str]:
    lines: list[dict[str, str]] = []

    def logged() -> bool:
        lines[:] = [json.loads(x) for x in leader.log_text().splitlines() if x.startswith("{")]
        return any(line["event"] == "agent.started" for line in lines)

    wait_until(logged, 30, "agent.started in the leader's log")
    return next(line for line in lines if line["event"] == "agent.started")


@pytest.mark.parametrize(("env", "expected"), [({}, "uvloop"), ({LOOP_ENV: "asyncio"}, "asyncio")])
async def test_the_leader_runs_on_the_loop_asked_for(
    leader_process: Callable[..., LeaderProcess], env: dict[str, str], expected: str
) -> None:
    leader = leader_process()
    leader.start(env=env)
    assert _started(leader)["event_loop"] == expected
    assert leader.terminate() == 0


def test_an_unknown_loop_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('role = "leader"\n')
    done = subprocess.run(
        [sys.executable, "-m", "agent", "run", "-c", str(config)],
        env={LOOP_ENV: "trio", "PATH": "/usr/bin:/bin"},
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"{LOOP_ENV} is 'trio'; it takes uvloop or asyncio" in done.stderr
