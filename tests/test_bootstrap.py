"""`deploy-agent bootstrap` against a real sshd on loopback: this machine plays the host,
without systemd, with a worker engine of its own, enrolling into a real leader over TLS.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import agent
from tests.support.contexts import busybox_context
from tests.support.dockerd import Dockerd
from tests.support.leader import InProcessLeader
from tests.support.procs import free_port
from tests.support.registry import Registry
from tests.support.sshd import Sshd
from tests.support.wheels import REQUIREMENTS, ROOT, Wheelhouse, run, source_copy

SCRIPT = str(Path(sys.executable).parent / "deploy-agent")
TLS = {"plain_http": None}


@dataclass
class Run:
    status: int
    events: list[dict[str, Any]]
    stderr: str
    seconds: float

    def steps(self) -> dict[str, dict[str, Any]]:
        """The final report of each step, by name."""
        done = [e for e in self.events if e.get("event") == "bootstrap.step"]
        return {e["step"]: e for e in done if e["status"] != "started"}


@dataclass
class Host:
    """The paths one bootstrapped "host" uses under the test's folder."""

    root: Path

    @property
    def prefix(self) -> Path:
        return self.root / "opt"

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def agent_pid(self) -> int:
        return int((self.prefix / "agent.pid").read_text())

    def flags(self) -> list[str]:
        return [
            *("--prefix", str(self.prefix)),
            *("--config-dir", str(self.config_dir)),
            *("--state-dir", str(self.state_dir)),
        ]


Bootstrap = Callable[..., Any]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


async def _stop_agent(host: Host) -> None:
    """End the agent the bootstrap started on the "host" (not our child: sshd's)."""
    pid_file = host.prefix / "agent.pid"
    if not pid_file.exists() or not _alive(pid := host.agent_pid()):
        return
    os.kill(pid, signal.SIGTERM)
    for _ in range(150):
        if not _alive(pid):
            return
        await asyncio.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def bootstrap(
    sshd: Sshd,
    wheelhouse: Wheelhouse,
    worker_engines: list[Dockerd],
    tmp_path: Path,
) -> AsyncIterator[Bootstrap]:
    hosts: list[Host] = []

    async def run(
        leader: InProcessLeader, host: Host, *extra: str, wheel: bool = True, name: str = "boot-1"
    ) -> Run:
        if host not in hosts:
            hosts.append(host)
        token_file = tmp_path / "join-token"
        token_file.write_text(await leader.api.join_token() + "\n")
        args = [
            *(sshd.url, "--role", "worker", "--leader-url", leader.url, "--name", name),
            *("--join-token-file", str(token_file)),
            *("--known-hosts", str(sshd.known_hosts), "--identity", str(sshd.identity)),
            *("--wheelhouse", str(wheelhouse.directory)),
            *(("--wheel", str(wheelhouse.wheel)) if wheel else ()),
            *("--engine-url", worker_engines[0].url, "--wait", "60"),
            *("--url", leader.url, "--ca-file", str(leader.config.state_path / "tls" / "ca.pem")),
            *host.flags(),
            *extra,
        ]
        return await _cli(leader, args)

    yield run
    for host in hosts:
        await _stop_agent(host)


async def _cli(leader: InProcessLeader, args: list[str]) -> Run:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        SCRIPT,
        "bootstrap",
        *args,
        env=os.environ | {"DEPLOY_AGENT_TOKEN": leader.api.token},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 110)
    assert proc.returncode is not None
    events = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    return Run(proc.returncode, events, err.decode(), time.monotonic() - started)


async def test_bootstrap_installs_a_worker_that_connects_and_pulls(
    leader_factory: Callable[..., Any],
    bootstrap: Bootstrap,
    registry: Registry,
    worker_engines: list[Dockerd],
    tmp_path: Path,
) -> None:
    """Every step reports ok (systemd skipped, nohup start said so), the node connects with
    the package's version, its files have the right modes, and a deployment reaches it."""
    leader: InProcessLeader = await leader_factory(leader=TLS)
    host = Host(tmp_path / "host")

    run = await bootstrap(leader, host)

    assert run.status == 0, run.stderr
    steps = run.steps()
    assert list(steps) == [
        *("wheel", "connect", "leader", "engine", "python", "upload", "virtualenv"),
        *("install", "config", "service", "start", "connected"),
    ]
    assert steps["service"]["status"] == "skipped"
    assert steps["service"]["detail"] == "no systemd on this host"
    assert steps["start"]["detail"].startswith("started without systemd (nohup): pid ")
    assert all(s["status"] == "ok" for n, s in steps.items() if n != "service")
    assert steps["virtualenv"]["detail"].startswith("created ")
    assert steps["engine"]["detail"].startswith("Docker Engine 20.")
    nodes = await leader.api.nodes()
    assert nodes["boot-1"]["connected"] is True
    assert nodes["boot-1"]["agent_version"] == agent.__version__
    _, cluster = await leader.api.request("GET", "/v1/cluster")
    assert cluster["leader"]["version"] == agent.__version__
    assert steps["connected"]["detail"].endswith("; join token removed from the host")
    assert not (host.config_dir / "join-token").exists()  # enrolled: it has its own secret
    token = (tmp_path / "join-token").read_text().strip()  # the operator's copy
    config = (host.config_dir / "config.toml").read_text()
    assert token not in config
    assert "join_token_file" not in config, config  # the file is gone: not named either
    assert token not in json.dumps(run.events) + run.stderr

    status, _ = await leader.api.put_registry(registry.host, registry.username, registry.password)
    assert status == 200
    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "booted")
    final = await leader.api.wait_final(dep["id"])
    assert final["state"] == "succeeded", final
    assert final["nodes"]["boot-1"]["status"] == "present"
    assert worker_engines[0].cli("image", "inspect", final["image"], check=False).returncode == 0


async def test_bootstrap_again_keeps_the_node_and_replaces_the_agent(
    leader_factory: Callable[..., Any], bootstrap: Bootstrap, tmp_path: Path
) -> None:
    """A second run reuses the virtualenv, keeps the node's identity, rewrites the config,
    and leaves exactly one agent running, connected as the same node. The first run builds
    its own wheel from this checkout."""
    leader: InProcessLeader = await leader_factory(leader=TLS)
    host = Host(tmp_path / "host")
    first = await bootstrap(leader, host, wheel=False)
    assert first.status == 0, first.stderr
    assert "built from" in first.steps()["wheel"]["detail"]
    node_id = (await leader.api.nodes())["boot-1"]["id"]
    first_pid = host.agent_pid()
    (host.config_dir / "config.toml").write_text("# changed by hand\n")

    again = await bootstrap(leader, host)

    assert again.status == 0, again.stderr
    steps = again.steps()
    assert steps["virtualenv"]["detail"].startswith("reused ")
    assert steps["leader"]["detail"].endswith(f"node boot-1 enrolled as {node_id}")
    assert steps["config"]["detail"].endswith("identity kept")
    assert 'name = "boot-1"' in (host.config_dir / "config.toml").read_text()
    assert not _alive(first_pid)
    assert _alive(host.agent_pid())
    nodes = await leader.api.nodes()
    assert list(nodes) == ["boot-1"]
    assert nodes["boot-1"]["id"] == node_id
    assert nodes["boot-1"]["connected"] is True


async def test_bootstrap_again_after_a_revoke_enrols_the_host_afresh(
    leader_factory: Callable[..., Any], bootstrap: Bootstrap, tmp_path: Path
) -> None:
    """The node was revoked: a second run sets the host's old identity aside (the agent
    would be refused with it for good) and the host enrols again as a new node."""
    leader: InProcessLeader = await leader_factory(leader=TLS)
    host = Host(tmp_path / "host")
    first = await bootstrap(leader, host)
    assert first.status == 0, first.stderr
    old_id = (await leader.api.nodes())["boot-1"]["id"]
    status, _ = await leader.api.request("DELETE", f"/v1/nodes/{old_id}")
    assert status == 200

    again = await bootstrap(leader, host)

    assert again.status == 0, again.stderr
    assert "set aside: it enrols with the join token" in again.steps()["config"]["detail"]
    nodes = await leader.api.nodes()
    assert nodes["boot-1"]["connected"] is True
    assert nodes["boot-1"]["id"] != old_id


async def test_a_wrong_host_key_is_refused_before_anything_happens(
    leader_factory: Callable[..., Any], bootstrap: Bootstrap, sshd: Sshd, tmp_path: Path
) -> None:
    """A known_hosts that holds another key for the host stops the run at `connect`, with
    the reason, and the host is left untouched."""
    leader: InProcessLeader = await leader_factory(leader=TLS)
    host = Host(tmp_path / "host")

    run = await bootstrap(leader, host, "--known-hosts", str(sshd.impostor_known_hosts()))

    assert run.status == 1
    assert "bootstrap failed at step 'connect'" in run.stderr
    assert "host key is not trusted" in run.stderr
    failed = run.steps()["connect"]
    assert failed["status"] == "failed"
    assert "host key is not trusted" in failed["error"]
    assert not host.root.exists()


async def test_a_failing_step_says_which_and_why(
    leader_factory: Callable[..., Any], bootstrap: Bootstrap, tmp_path: Path
) -> None:
    """An engine that does not answer on the host fails the `engine` step with Docker's
    own reason, before anything is installed."""
    leader: InProcessLeader = await leader_factory(leader=TLS)
    host = Host(tmp_path / "host")

    run = await bootstrap(leader, host, "--engine-url", f"unix://{tmp_path}/none.sock")

    assert run.status == 1
    assert "bootstrap failed at step 'engine'" in run.stderr
    assert "Cannot connect to the Docker daemon" in run.steps()["engine"]["error"]
    assert not host.prefix.exists()


def _installed_from_the_wheel(wheelhouse: Wheelhouse, venv: Path) -> Path:
    """deploy-agent installed as a node installs it: the lock's wheels, then its own."""
    run(sys.executable, "-m", "venv", venv)
    pip = (venv / "bin" / "pip", "install", "-q", "--no-index", "--disable-pip-version-check")
    run(*pip, "--find-links", wheelhouse.directory, "--require-hashes", "-r", REQUIREMENTS)
    run(*pip, "--no-deps", wheelhouse.wheel)
    return venv / "bin" / "deploy-agent"


@pytest.mark.timeout(300)
async def test_an_agent_installed_from_its_wheel_builds_one_from_the_checkout_it_runs_in(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    """Installed from a wheel, the agent has no checkout of its own: run in one of its
    version, `bootstrap` builds the wheel there (with uv) and goes on to connect; in a
    checkout of another version it stops at the wheel step naming both versions."""
    program = _installed_from_the_wheel(wheelhouse, tmp_path / "venv")
    checkout = source_copy(tmp_path)
    token = tmp_path / "join-token"
    token.write_text("DAT1-" + "0" * 64 + "-secret\n")
    (tmp_path / "known_hosts").write_text("")  # no key: the connect step refuses the host
    args = [
        *(program, "bootstrap", f"ssh://root@127.0.0.1:{free_port()}", "--role", "worker"),
        *("--leader-url", "https://leader.test:7443", "--join-token-file", token),
        *("--known-hosts", tmp_path / "known_hosts", "--url", "http://127.0.0.1:9"),
    ]
    env = os.environ | {
        "DEPLOY_AGENT_TOKEN": "t" * 20,
        "PATH": f"{ROOT / '.tools' / 'bin'}:{os.environ['PATH']}",  # uv, as a user has it
    }

    done = await asyncio.to_thread(_run_in, checkout, env, args)
    steps = {e["step"]: e for e in done if e.get("status") not in (None, "started")}
    assert steps["wheel"]["status"] == "ok", steps
    assert steps["wheel"]["detail"].startswith(f"deploy_agent-{agent.__version__}-")
    assert f"built from {checkout}" in steps["wheel"]["detail"]
    assert steps["connect"]["status"] == "failed"  # nothing listens there: as far as it goes

    pyproject = checkout / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace(agent.__version__, "9.9.9", 1))
    done = await asyncio.to_thread(_run_in, checkout, env, args)
    wheel = next(e for e in done if e.get("step") == "wheel" and e["status"] == "failed")
    assert "9.9.9" in wheel["error"] and agent.__version__ in wheel["error"], wheel


def _run_in(cwd: Path, env: dict[str, str], args: list[object]) -> list[dict[str, Any]]:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
