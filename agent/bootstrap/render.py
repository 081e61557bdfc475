"""The files and shell scripts a bootstrap puts on the host, as plain text.

Pure functions of the plan, so they are tested without a host. Every path is quoted;
no script ever carries a secret (the join token goes in a file over SFTP).
"""

from __future__ import annotations

import json
from importlib.resources import files
from shlex import quote

from agent.bootstrap.plan import UNIT_NAME, Plan

SERVICE_USER = "deploy-agent"
DEFAULT_EXEC = "/opt/deploy-agent/bin/deploy-agent-guard"
DEFAULT_RELEASES = "/opt/deploy-agent/releases"
DEFAULT_CONFIG = "/etc/deploy-agent/config.toml"


def worker_config(plan: Plan, name: str, *, join_token: bool = True) -> str:
    """The worker's config.toml: no secret in it, the join token is its own file, named
    only until the node has enrolled (then the file is gone, and so is its key)."""
    return "\n".join(
        [
            "# Written by `deploy-agent bootstrap`: running it again rewrites this file.",
            'role = "worker"',
            f"state_dir = {_toml(plan.state_dir)}",
            "",
            "[engine]",
            f"url = {_toml(plan.engine_url)}",
            "",
            "[worker]",
            f"leader_url = {_toml(plan.leader_url)}",
            *([f"join_token_file = {_toml(plan.token_path)}"] if join_token else []),
            f"name = {_toml(name)}",
            "",
        ]
    )


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def unit_file(plan: Plan) -> str:
    """The packaged worker unit, pointed at this plan's virtualenv and config."""
    text = files("agent").joinpath("units", UNIT_NAME).read_text()
    text = text.replace(DEFAULT_EXEC, plan.guard_path).replace(DEFAULT_CONFIG, plan.config_path)
    return text.replace(DEFAULT_RELEASES, plan.releases_dir)


def guard() -> bytes:
    """The guard the unit starts: it starts the current release, and falls back to the
    previous one when a new one fails on trial."""
    return files("agent").joinpath("units", "deploy-agent-guard").read_bytes()


def engine_check(plan: Plan) -> str:
    """Prints the engine's version, or `socket` when only the socket can be seen."""
    url = quote(plan.engine_url)
    socket = quote(plan.engine_url.removeprefix("unix://"))
    return (
        "if command -v docker >/dev/null 2>&1; then "
        f"docker -H {url} version --format '{{{{.Server.Version}}}}'; "
        f"else test -S {socket} && echo socket; fi"
    )


PYTHON_CHECK = (
    "python3 -c 'import sys, venv, ensurepip; print(\"%d.%d.%d\" % sys.version_info[:3])'"
)
SYSTEMD_CHECK = "test -d /run/systemd/system && command -v systemctl >/dev/null && echo systemd"


def virtualenv(plan: Plan, version: str) -> str:
    """Reuses the release's working virtualenv (its pip too: one cut short may lack it),
    else makes one; prints which."""
    venv = quote(plan.venv(version))
    return (
        f"if {venv}/bin/python -m pip --version >/dev/null 2>&1; then echo reused; "
        f"else rm -rf {venv} && python3 -m venv {venv} && echo created; fi"
    )


def install(plan: Plan, version: str, wheel_name: str, offline: bool) -> str:
    """Installs the locked dependencies, each checked against its hash (from the uploaded
    wheels, or from the index), then the wheel itself, also over an equal version; makes
    the release current (the one it replaces stays as previous, and no trial: the
    operator installs it), and prints the current program's version."""
    pip = f"{quote(plan.venv(version))}/bin/pip install --disable-pip-version-check -q"
    wheel = quote(f"{plan.wheels_dir}/{wheel_name}")
    requirements = quote(f"{plan.wheels_dir}/requirements.txt")
    source = f"--no-index --find-links {quote(plan.wheels_dir)} " if offline else ""
    releases = quote(plan.releases_dir)
    return "; ".join(
        [
            "set -e",
            f"{pip} {source}--require-hashes -r {requirements}",
            f"{pip} --no-index --no-deps --force-reinstall {wheel}",
            f"cd {releases}",
            "old=$(readlink current || true)",
            f'if [ -n "$old" ] && [ "$old" != {quote(version)} ]; then '
            'ln -sfn "$old" .previous.new && mv -Tf .previous.new previous; fi',
            f"ln -sfn {quote(version)} .current.new && mv -Tf .current.new current",
            "rm -f trial trial.starts",
            f"{quote(plan.agent_bin)} --version",
        ]
    )


def check_config(plan: Plan, path: str) -> str:
    return f"{quote(plan.agent_bin)} check-config -c {quote(path)}"


def put_config_in_place(plan: Plan, staged: str) -> str:
    """Hands the files to the service user if it exists (a run before made it, and its
    agent reads them at its next restart), then moves the checked config into place."""
    user, token = SERVICE_USER, quote(plan.token_path)
    return "; ".join(
        [
            "set -e",
            f"if id -u {user} >/dev/null 2>&1; then "
            f"chown {user}:{user} {token}; chown root:{user} {quote(staged)}; fi",
            f"mv -f {quote(staged)} {quote(plan.config_path)}",
        ]
    )


def forget_join_token(plan: Plan, staged: str) -> str:
    """Puts the config that names no join token in place (checked first), then removes
    the token: the node has enrolled and needs neither."""
    return "; ".join(
        [
            "set -e",
            check_config(plan, staged),
            put_config_in_place(plan, staged),
            f"rm -f {quote(plan.token_path)}",
        ]
    )


def identity_node_id(plan: Plan) -> str:
    """Prints the node id the host's identity holds (never its secret), or nothing."""
    program = "import json, sys; print(json.load(open(sys.argv[1]))['node_id'])"
    return f"python3 -c {quote(program)} {quote(plan.identity_path)} 2>/dev/null || true"


def set_identity_aside(plan: Plan) -> str:
    """Moves an identity the leader no longer knows out of the agent's way (kept, 0600,
    for an operator to look at), so that the agent enrols afresh."""
    path = quote(plan.identity_path)
    return f'mv -f {path} {path}.unknown-"$(date +%s)"'


def has_identity(plan: Plan) -> str:
    return f"test -f {quote(plan.identity_path)} && echo kept || echo none"


def systemd_install(plan: Plan) -> str:
    """Makes the service user, hands it its files, then enables and (re)starts the unit."""
    user = SERVICE_USER
    return "; ".join(
        [
            "set -e",
            "getent group docker >/dev/null || "
            "{ echo 'no docker group on this host: is Docker installed?' >&2; exit 1; }",
            f"id -u {user} >/dev/null 2>&1 || useradd --system --user-group "
            f"--home-dir {quote(plan.state_dir)} --no-create-home "
            f"--shell /usr/sbin/nologin {user}",
            f"chown {user}:{user} {quote(plan.token_path)}",
            f"chown root:{user} {quote(plan.config_path)}",
            # the worker installs new releases there itself (the unit lets it write there)
            f"chown -R {user}:{user} {quote(plan.releases_dir)}",
            "systemctl daemon-reload",
            f"systemctl enable --quiet {UNIT_NAME}",
            f"systemctl restart {UNIT_NAME}",
            f"systemctl is-active {UNIT_NAME}",
        ]
    )


def nohup_start(plan: Plan) -> str:
    """Stops the agent an earlier run started (if its pid is still ours), starts it anew
    detached from the session, and prints its pid."""
    pidfile, agent = quote(plan.pid_path), quote(plan.guard_path)
    return "\n".join(
        [
            f"old=$(cat {pidfile} 2>/dev/null || true)",
            f'if [ -n "$old" ] && grep -qF {agent} "/proc/$old/cmdline" 2>/dev/null; then '
            'kill -TERM "$old"; for i in $(seq 100); do '
            'kill -0 "$old" 2>/dev/null || break; sleep 0.2; done; '
            'kill -KILL "$old" 2>/dev/null || true; fi',
            f"nohup {agent} run -c {quote(plan.config_path)} "
            f">>{quote(plan.log_path)} 2>&1 </dev/null &",
            f"echo $! >{pidfile}",
            "echo $!",
        ]
    )


def log_tail(plan: Plan, systemd: bool) -> str:
    if systemd:
        return f"journalctl -u {UNIT_NAME} -n 20 --no-pager -o cat"
    return f"tail -n 20 {quote(plan.log_path)}"
