"""The guard (systemd/deploy-agent-guard) on its own, with stand-in releases whose
`deploy-agent` is a short script: how it starts the current release with and without
systemd, counts the starts of a release on trial, falls back to the previous one, and
passes a stop on to the agent.

The real releases and a real leader are in test_upgrades.py; no systemd runs on this
machine, so its part (starting the unit again after an exit) is played by the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.releases import GUARD


def _release(releases: Path, version: str, body: str) -> None:
    program = releases / version / "venv" / "bin" / "deploy-agent"
    program.parent.mkdir(parents=True)
    program.write_text(f'#!/bin/sh\necho "{version} $$ $*" >>"$LOG"\n{body}\n')
    program.chmod(0o755)


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """PREFIX/bin/deploy-agent-guard, releases 1.0 (current, good) and 2.0 (exits 1)."""
    (tmp_path / "bin").mkdir()
    guard = tmp_path / "bin" / "deploy-agent-guard"
    guard.write_bytes(GUARD.read_bytes())
    guard.chmod(0o755)
    releases = tmp_path / "releases"
    _release(releases, "1.0", "exit 0")
    _release(releases, "2.0", "exit 1")
    (releases / "current").symlink_to("1.0")
    return tmp_path


def _put_on_trial(layout: Path) -> None:
    releases = layout / "releases"
    (releases / "previous").symlink_to("1.0")
    (releases / "current").unlink()
    (releases / "current").symlink_to("2.0")
    (releases / "trial").write_text("2.0 up-1\n")


def _guard(layout: Path, *, systemd: bool, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "LOG": str(layout / "starts.log"),
        "DEPLOY_AGENT_RESTART_SECONDS": "0",
        **({"INVOCATION_ID": "0123"} if systemd else {}),
    }
    return subprocess.run(
        [str(layout / "bin" / "deploy-agent-guard"), "run", "-c", "config.toml"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _guard_pid(layout: Path) -> tuple[int, int]:
    """Run the guard as systemd would (INVOCATION_ID set): its status and its pid."""
    env = {
        "PATH": os.environ["PATH"],
        "LOG": str(layout / "starts.log"),
        "INVOCATION_ID": "0123",
    }
    guard = subprocess.Popen(
        [str(layout / "bin" / "deploy-agent-guard"), "run"], env=env, stderr=subprocess.DEVNULL
    )
    return guard.wait(timeout=30), guard.pid


def _starts(layout: Path) -> list[str]:
    return [line.split()[0] for line in (layout / "starts.log").read_text().splitlines()]


def test_it_starts_the_current_release_with_the_arguments_it_was_given(layout: Path) -> None:
    """No trial: the current release runs once with `run -c FILE`, and its status is the
    guard's."""
    done = _guard(layout, systemd=False)
    assert done.returncode == 0
    assert (layout / "starts.log").read_text().split()[2:] == ["run", "-c", "config.toml"]


def test_without_systemd_a_failing_release_on_trial_is_undone_after_three_starts(
    layout: Path,
) -> None:
    """Release 2.0 on trial exits 1 at each start: after three, `current` is 1.0 again,
    `rolled-back` says which release failed and why, and 1.0 runs."""
    _put_on_trial(layout)
    done = _guard(layout, systemd=False)
    releases = layout / "releases"
    assert done.returncode == 0
    assert _starts(layout) == ["2.0", "2.0", "2.0", "1.0"]
    assert os.readlink(releases / "current") == "1.0"
    assert not (releases / "trial").exists() and not (releases / "trial.starts").exists()
    failed, why = (releases / "rolled-back").read_text().splitlines()
    assert failed == "2.0 up-1"
    assert "3 starts" in why
    assert "release 2.0 did not start" in done.stderr


def test_under_systemd_it_becomes_the_agent_and_the_unit_restarts_count(layout: Path) -> None:
    """With INVOCATION_ID the guard execs the agent (the same process: systemd's main pid
    is the agent's, for sd_notify), so each failed start ends it; the starts systemd
    makes are counted all the same, and the fourth falls back to 1.0."""
    _put_on_trial(layout)
    runs = [_guard_pid(layout) for _ in range(4)]
    assert [status for status, _ in runs] == [1, 1, 1, 0]
    assert _starts(layout) == ["2.0", "2.0", "2.0", "1.0"]
    agent_pids = [int(line.split()[1]) for line in (layout / "starts.log").read_text().splitlines()]
    assert agent_pids == [pid for _, pid in runs]  # the guard's own process became the agent
    assert os.readlink(layout / "releases" / "current") == "1.0"


@pytest.mark.parametrize("status", [0, 2, 3, 4])
def test_a_release_on_trial_that_ends_at_all_is_counted(layout: Path, status: int) -> None:
    """Off trial, 0, 2, 3 and 4 end the guard (done, or a restart cannot help); on
    trial, a release that ends with any of them has failed: counted, and undone."""
    _release(layout / "releases", "2.5", f"exit {status}")
    _put_on_trial(layout)
    (layout / "releases" / "current").unlink()
    (layout / "releases" / "current").symlink_to("2.5")
    (layout / "releases" / "trial").write_text("2.5 up-2\n")
    done = _guard(layout, systemd=False)
    assert done.returncode == 0
    assert _starts(layout) == ["2.5", "2.5", "2.5", "1.0"]


def test_a_trial_marker_of_another_release_is_dropped_not_counted(layout: Path) -> None:
    """A switch cut short (its trial written, `current` not yet moved) leaves a marker
    that names another release than `current`: the guard drops it and never falls back."""
    (layout / "releases" / "trial").write_text("2.0 up-3\n")
    for _ in range(5):
        assert _guard(layout, systemd=True).returncode == 0
    assert _starts(layout) == ["1.0"] * 5
    assert not (layout / "releases" / "trial").exists()
    assert not (layout / "releases" / "rolled-back").exists()


def test_exit_75_starts_the_new_current_release_at_once(layout: Path) -> None:
    """A worker that installed a release exits 75: the guard starts `current` again
    without waiting, now the new one."""
    releases = layout / "releases"
    (releases / "1.0" / "venv" / "bin" / "deploy-agent").write_text(
        '#!/bin/sh\necho "1.0 $$" >>"$LOG"\n'
        'cd "$(dirname "$0")/../../.." && ln -sfn 3.0 current && exit 75\n'
    )
    _release(releases, "3.0", "exit 0")
    done = _guard(layout, systemd=False)
    assert done.returncode == 0
    assert _starts(layout) == ["1.0", "3.0"]


def test_a_stop_reaches_the_agent_and_ends_the_guard(layout: Path) -> None:
    """Without systemd the guard is the agent's parent: SIGTERM to the guard goes on to
    the agent, and the guard ends with the agent's status instead of starting it again."""
    releases = layout / "releases"
    program = releases / "1.0" / "venv" / "bin" / "deploy-agent"
    program.write_text(
        '#!/bin/sh\necho "1.0 $$" >>"$LOG"\n'
        "trap 'echo stopped >>\"$LOG\"; exit 0' TERM\nwhile :; do sleep 0.1; done\n"
    )
    env = {**os.environ, "LOG": str(layout / "starts.log")}
    env.pop("INVOCATION_ID", None)
    guard = subprocess.Popen([str(layout / "bin" / "deploy-agent-guard"), "run"], env=env)
    try:
        deadline = time.monotonic() + 10
        while not (layout / "starts.log").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        guard.send_signal(signal.SIGTERM)
        assert guard.wait(timeout=10) == 0
    finally:
        guard.kill()
    assert (layout / "starts.log").read_text().splitlines()[-1] == "stopped"
