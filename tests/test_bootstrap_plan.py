"""The bootstrap's plan and what it renders, without a host: targets, the worker config,
the scripts, and the join token kept out of every one of them."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import cast

import pytest

from agent.bootstrap import render, steps
from agent.bootstrap.plan import UNIT_NAME, Plan
from agent.bootstrap.steps import LeaderApi, Session
from agent.config import parse_config
from agent.errors import BootstrapError
from agent.ssh import Completed, SshHost
from agent.ssh_target import SshTarget
from tests.support.units import verify

TOKEN = "DAT1-" + "ab" * 32 + "-secretpart0123456789"


def _plan(tmp_path: Path, **overrides: object) -> Plan:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    fields: dict[str, object] = {
        "target": SshTarget("root", "node-1.example.com", 2222),
        "leader_url": "https://leader.example.com:7443",
        "join_token": TOKEN,
        "known_hosts": known_hosts,
        "prefix": "/opt/deploy agent",  # a space, to prove paths are quoted
    }
    return Plan(**(fields | overrides))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ssh://root@10.0.0.5", SshTarget("root", "10.0.0.5", 22)),
        ("ssh://deploy@node-1:2222", SshTarget("deploy", "node-1", 2222)),
        ("ssh://root@[::1]:2200", SshTarget("root", "::1", 2200)),
    ],
)
def test_ssh_targets_parse(url: str, expected: SshTarget) -> None:
    """`ssh://user@host[:port]`, IPv6 in brackets, port 22 by default."""
    assert SshTarget.parse(url) == expected


@pytest.mark.parametrize(
    "url", ["root@host", "ssh://host", "ssh://root:pw@host", "ssh://root@host/x", "ssh://r@h:0x"]
)
def test_bad_ssh_targets_are_refused(url: str) -> None:
    """No user, a password, a path or a bad port: refused with the expected form."""
    with pytest.raises(ValueError, match=r"ssh://user@host"):
        SshTarget.parse(url)


def test_the_worker_config_is_valid_and_holds_no_secret(tmp_path: Path) -> None:
    """The written config loads as a worker config; the token is a separate file."""
    plan = _plan(tmp_path, config_dir=str(tmp_path))
    (tmp_path / "join-token").write_text(TOKEN + "\n")
    text = render.worker_config(plan, "node-1")

    config = parse_config(tomllib.loads(text))
    assert config.worker is not None
    assert (config.worker.name, config.worker.join_token) == ("node-1", TOKEN)
    assert config.worker.leader_url == plan.leader_url
    assert TOKEN not in text


def test_no_script_or_repr_carries_the_token(tmp_path: Path) -> None:
    """Every command the bootstrap runs, and the plan's repr, are free of the join token."""
    plan = _plan(tmp_path)
    scripts = [
        render.engine_check(plan),
        render.virtualenv(plan, "0.2.0"),
        render.install(plan, "0.2.0", "deploy_agent-0.2.0-py3-none-any.whl", offline=True),
        render.check_config(plan, plan.config_path),
        render.put_config_in_place(plan, plan.config_path + ".new"),
        render.systemd_install(plan),
        render.nohup_start(plan),
        render.log_tail(plan, systemd=False),
        repr(plan),
    ]
    assert all(TOKEN not in s and "secretpart" not in s for s in scripts)
    assert "'/opt/deploy agent/releases/0.2.0/venv'" in render.virtualenv(plan, "0.2.0")


def test_systemd_install_makes_the_user_and_restarts_the_unit(tmp_path: Path) -> None:
    """With systemd: a system user, its token file, then daemon-reload, enable, restart."""
    script = render.systemd_install(_plan(tmp_path))
    order = [
        "useradd --system",
        "chown deploy-agent:deploy-agent /etc/deploy-agent/join-token",
        "chown root:deploy-agent /etc/deploy-agent/config.toml",
        "systemctl daemon-reload",
        "systemctl enable --quiet deploy-agent-worker.service",
        "systemctl restart deploy-agent-worker.service",
    ]
    positions = [script.index(step) for step in order]
    assert positions == sorted(positions)


def test_plans_are_checked_before_anything_runs(tmp_path: Path) -> None:
    """A relative path, a bad node name, a missing known_hosts, a leader URL without TLS
    (the token would cross in the clear) or a file holding something other than a join
    token is refused up front."""
    with pytest.raises(ValueError, match="--prefix must be an absolute path"):
        _plan(tmp_path, prefix="opt")
    with pytest.raises(ValueError, match="--name"):
        _plan(tmp_path, name="bad name")
    with pytest.raises(ValueError, match="--known-hosts: no file"):
        _plan(tmp_path, known_hosts=tmp_path / "missing")
    with pytest.raises(ValueError, match="--leader-url must start with https://"):
        _plan(tmp_path, leader_url="http://leader.example.com:7443")
    with pytest.raises(ValueError, match="does not hold a join token"):
        _plan(tmp_path, join_token="canary-api-token-of-the-leader")


def test_the_worker_unit_points_at_the_plans_paths_and_verifies(tmp_path: Path) -> None:
    """The unit a bootstrap writes runs the guard under --prefix with the config under
    --config-dir, may write that prefix's releases, and `systemd-analyze verify` still
    accepts it."""
    plan = _plan(tmp_path, prefix="/srv/agent", config_dir="/srv/etc")
    text = render.unit_file(plan)
    assert "ExecStart=/srv/agent/bin/deploy-agent-guard run -c /srv/etc/config.toml" in text
    assert "ReadWritePaths=-/srv/agent/releases\n" in text
    assert verify(tmp_path, UNIT_NAME, text, "/srv/agent/bin/deploy-agent-guard") == ""


class ScriptedHost:
    """Records what a step writes and runs; answers the systemd probe and check-config."""

    def __init__(self, *, systemd: bool, config_ok: bool = True) -> None:
        self.systemd, self.config_ok = systemd, config_ok
        self.writes: list[str] = []
        self.commands: list[str] = []

    async def write_file(self, path: str, data: bytes, *, mode: int, deadline: float) -> None:
        self.writes.append(path)

    async def run(self, command: str, *, deadline: float, label: str | None = None) -> Completed:
        self.commands.append(command)
        if command == render.SYSTEMD_CHECK:
            return Completed(command, 0, "systemd\n" if self.systemd else "", "")
        if "check-config" in command:
            return Completed(command, 0 if self.config_ok else 1, "", "config: refused")
        return Completed(command, 0, "none\n", "")


async def _write_config(plan: Plan, host: ScriptedHost) -> None:
    session = Session(plan=plan, leader=cast(LeaderApi, None), workdir=plan.known_hosts.parent)
    session.host, session.name = cast(SshHost, host), "w1"
    await steps.write_config(session)


async def test_a_run_that_will_be_refused_changes_no_file_on_the_host(tmp_path: Path) -> None:
    """A state directory the systemd unit cannot use is refused before anything is
    written, and a config check-config refuses never replaces the one in place: the
    agent running there must still start with its files at its next restart."""
    host = ScriptedHost(systemd=True)
    with pytest.raises(BootstrapError, match="drop --state-dir"):
        await _write_config(_plan(tmp_path, state_dir="/srv/agent"), host)
    assert host.writes == []

    host = ScriptedHost(systemd=True, config_ok=False)
    plan = _plan(tmp_path)
    with pytest.raises(BootstrapError, match="the old one stays"):
        await _write_config(plan, host)
    assert plan.config_path not in host.writes
    assert not any("mv -f" in command for command in host.commands)


async def test_the_checked_config_is_handed_to_the_service_user_then_moved_in(
    tmp_path: Path,
) -> None:
    host = ScriptedHost(systemd=True)
    plan = _plan(tmp_path)
    await _write_config(plan, host)
    staged = plan.config_path + ".new"
    assert host.writes == [plan.token_path, staged]
    checked = next(i for i, c in enumerate(host.commands) if "check-config" in c)
    moved = next(i for i, c in enumerate(host.commands) if "mv -f" in c)
    assert checked < moved
    assert "chown root:deploy-agent" in host.commands[moved]
