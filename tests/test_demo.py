"""`./scripts/demo`, the main job, run as written in a copy of the checkout against an
engine of the test's own (DOCKER_HOST): it deploys the example app, serves it on the URL
it prints, leaves its leader running for more, and `./scripts/demo stop` ends both."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.support.dockerd import Dockerd
from tests.support.procs import free_port
from tests.support.wheels import ROOT, source_copy


def _demo(checkout: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["./scripts/demo", *args],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.timeout(600)
def test_the_demo_serves_the_app_and_leaves_its_leader_running(tmp_path: Path) -> None:
    """The demo exits 0, the app answers on the printed URL with the example's page,
    the leader answers `status` through the printed command, and `stop` ends both."""
    checkout = source_copy(tmp_path)
    shutil.copytree(ROOT / ".tools", checkout / ".tools", symlinks=True)  # uv, as set up
    engine = Dockerd(bridge=True)  # as installed: RUN steps use the default bridge
    engine.start()
    port, app_port = free_port(), free_port()
    env = os.environ | {
        "DOCKER_HOST": engine.url,
        "DEMO_PORT": str(port),
        "DEMO_APP_PORT": str(app_port),
    }
    pid_file = checkout / ".demo" / "leader.pid"
    try:
        done = _demo(checkout, env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        url = f"http://127.0.0.1:{app_port}/"
        assert f"served on   {url}" in done.stdout, done.stdout
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.read() == (ROOT / "examples" / "hello" / "index.html").read_bytes()

        pid = int(pid_file.read_text())
        assert _alive(pid)
        assert f"(pid {pid}, log .demo/leader.log)" in done.stdout
        status = re.search(r"^  (\S+ status -c \S+)$", done.stdout, re.M)
        assert status, done.stdout
        listed = subprocess.run(
            status.group(1).split(), cwd=checkout, capture_output=True, text=True, check=True
        )
        assert "hello" in listed.stdout and "succeeded" in listed.stdout

        stopped = _demo(checkout, env, "stop")
        assert stopped.returncode == 0, stopped.stderr
        assert not _alive(pid)
        gone = engine.cli("container", "inspect", "deploy-agent-demo-hello", check=False)
        assert gone.returncode != 0
    finally:
        _stop_leftovers(checkout, env, pid_file)
        engine.stop()


def _stop_leftovers(checkout: Path, env: dict[str, str], pid_file: Path) -> None:
    """What a failed run left: the demo's own stop, then its leader by its pid."""
    _demo(checkout, env, "stop")
    try:
        pid = int(pid_file.read_text())
        if Path(f"/proc/{pid}/cwd").resolve() == checkout.resolve():
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass
