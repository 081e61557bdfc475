"""The bootstrap's plan and what it renders, without a host: targets, the worker config,
the scripts, and the join token kept out of every one of them."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from agent.bootstrap import render
from agent.bootstrap.plan import UNIT_NAME, Plan
from agent.config import parse_config
from agent.ssh import SshTarget
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
        render.virtualenv(plan),
        render.install(plan, "deploy_agent-0.1.0-py3-none-any.whl", offline=True),
        render.check_config(plan),
        render.systemd_install(plan),
        render.nohup_start(plan),
        render.log_tail(plan, systemd=False),
        repr(plan),
    ]
    assert all(TOKEN not in s and "secretpart" not in s for s in scripts)
    assert "'/opt/deploy agent/venv'" in render.virtualenv(plan)


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
    """A relative path, a bad node name or a missing known_hosts is refused up front."""
    with pytest.raises(ValueError, match="--prefix must be an absolute path"):
        _plan(tmp_path, prefix="opt")
    with pytest.raises(ValueError, match="--name"):
        _plan(tmp_path, name="bad name")
    with pytest.raises(ValueError, match="--known-hosts: no file"):
        _plan(tmp_path, known_hosts=tmp_path / "missing")


def test_the_worker_unit_points_at_the_plans_paths_and_verifies(tmp_path: Path) -> None:
    """The unit a bootstrap writes runs the program under --prefix with the config under
    --config-dir, and `systemd-analyze verify` still accepts it."""
    plan = _plan(tmp_path, prefix="/srv/agent", config_dir="/srv/etc")
    text = render.unit_file(plan)
    assert "ExecStart=/srv/agent/venv/bin/deploy-agent run -c /srv/etc/config.toml" in text
    assert verify(tmp_path, UNIT_NAME, text, "/srv/agent/venv/bin/deploy-agent") == ""
