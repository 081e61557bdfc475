"""The commands that are the daemon itself or a call or two to the leader's API: each
takes the parsed arguments and returns the process's exit code."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from agent import __version__, daemon, logs
from agent.cli import bootstrap as bootstrap_cmd
from agent.cli.client import Client, Target
from agent.cli.inputs import read_text
from agent.cli.output import built, print_table
from agent.config import Config, load_config
from agent.errors import AgentError, BootstrapError, ConfigError
from agent.files import others_may_read
from agent.worker.agent import LeaderTooOld, NodeRevoked, RestartRequested
from agent.worker.releases import Releases

DEFAULT_CONFIG = "/etc/deploy-agent/config.toml"
EXIT_CONFIG = 2  # the config is wrong: restarting cannot help until someone fixes it
EXIT_REVOKED = 3  # a revoked worker: restarting it cannot help
EXIT_LEADER_TOO_OLD = 4  # a worker newer than its leader: the leader is upgraded first
EXIT_RESTART = 75  # a new release is current: the guard (or the unit) starts it at once


def client_for(args: argparse.Namespace) -> Client:
    """A client of the leader the flags, the environment or a leader config name. The
    default config is read only when the first two leave the URL or the token unsaid: it
    may be unreadable here (0640 to the service's group) or take its token from the
    service's own environment."""
    config: Config | None = None
    # The config's API token only if the flags and the environment give none: it may
    # come from the service's environment, as may every other secret, never needed here.
    token_given = bool(args.token_file or os.environ.get("DEPLOY_AGENT_TOKEN"))
    needed = frozenset() if token_given else frozenset({"leader.api_token"})
    if args.config:
        config = load_config(args.config, needed=needed)
    elif not _leader_given(args) and Path(DEFAULT_CONFIG).exists():
        config = load_config(DEFAULT_CONFIG, needed=needed)
    return Client(Target.resolve(args.url, args.token_file, config, args.ca_file))


def _leader_given(args: argparse.Namespace) -> bool:
    url = args.url or os.environ.get("DEPLOY_AGENT_URL")
    token = args.token_file or os.environ.get("DEPLOY_AGENT_TOKEN")
    return bool(url and token)


# How the daemon's end maps to its exit status, first match wins: the event it logs,
# and the status the unit (or the guard) acts on.
_ENDINGS: tuple[tuple[type[AgentError], str, int], ...] = (
    (NodeRevoked, "agent.revoked", EXIT_REVOKED),
    (LeaderTooOld, "agent.leader_too_old", EXIT_LEADER_TOO_OLD),
    (RestartRequested, "agent.restarting", EXIT_RESTART),
    (ConfigError, "agent.failed", EXIT_CONFIG),  # found once running (a token file gone)
    (AgentError, "agent.failed", 1),
)


# Statuses after which the unit (and the guard) do not start the agent again.
FINAL_STATUSES = frozenset({EXIT_CONFIG, EXIT_REVOKED, EXIT_LEADER_TOO_OLD})


async def run(args: argparse.Namespace) -> int:
    """The daemon; its exit status. A release on trial after an upgrade that ends with a
    final status (its config refused by this release, say) has failed its trial: it exits
    1, so that it is started again and its guard, counting, falls back."""
    try:
        code = await _run(args)
    except ConfigError as exc:
        if not _on_trial():
            raise
        print(f"deploy-agent: config error: {exc.message}", file=sys.stderr)
        code = EXIT_CONFIG
    if code in FINAL_STATUSES and _on_trial():
        print(f"deploy-agent: exit {code} on trial: exit 1, for the guard", file=sys.stderr)
        return 1
    return code


def _on_trial() -> bool:
    releases = Releases.from_environ()
    trial = releases.trial() if releases is not None else None
    return trial is not None and trial.version == __version__


async def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    logs.configure(config.log.level, config.log.format)
    log = logs.get_logger("agent")
    try:
        await daemon.run(config)
    except AgentError as exc:
        event, code = next((e, c) for kind, e, c in _ENDINGS if isinstance(exc, kind))
        (log.info if code == EXIT_RESTART else log.error)(event, error=exc.message)
        return code
    except OSError as exc:  # its own port taken, a read-only state directory…
        log.error("agent.failed", error=str(exc) or repr(exc))
        return 1
    return 0


async def check_config(args: argparse.Namespace) -> int:
    # A secret from an environment variable is set in the service's environment, which
    # this shell need not have: noted, not an error.
    unset: list[str] = []
    config = load_config(args.config, unset_env=unset)
    if config.leader is not None and config.leader.build_server is not None:
        config.leader.build_server.check_files()
    for entry in unset:
        print(
            f"deploy-agent: {entry} is not set here; the service's environment must set it",
            file=sys.stderr,
        )
    token_file = config.leader.api_token_file if config.leader else None
    if token_file and (mode := others_may_read(token_file)):
        print(
            f"deploy-agent: warning: leader.api_token_file {token_file} is mode {mode}: every "
            f"user of this host can read the API token (chmod 600 {token_file})",
            file=sys.stderr,
        )
    print(f"{args.config}: ok (role {config.role})")
    return 0


async def status(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        if args.id:
            print(json.dumps(await client.call("GET", f"/v1/deployments/{args.id}"), indent=2))
            return 0
        params = {"limit": args.limit} | {k: v for k in ("app", "state") if (v := getattr(args, k))}
        doc = await client.call("GET", "/v1/deployments", params=params)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    rows = [
        (d["id"], d["app"], d["state"], d["mode"], d["image"] if built(d) else "-", _code(d))
        for d in doc["deployments"]
    ]
    headers = ("ID", "APP", "STATE", "MODE", "IMAGE", "ERROR")
    print_table(headers, rows, empty=_no_deployments(args))
    return 0


def _code(dep: dict[str, Any]) -> str:
    return str((dep.get("error") or {}).get("code") or "")


def _no_deployments(args: argparse.Namespace) -> str:
    which = [f"of app {args.app}"] if args.app else []
    which += [f"in state {args.state}"] if args.state else []
    return " ".join(["no deployments", *which])


async def cancel(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        dep = await client.call("POST", f"/v1/deployments/{args.id}/cancel")
    print(f"deployment {dep['id']}: {dep['state']}")
    return 0


async def registry_set(args: argparse.Namespace) -> int:
    password = await asyncio.to_thread(_read_password, args.password_file)
    body = {"server": args.server, "username": args.username, "password": password}
    if args.namespace:
        body["namespace"] = args.namespace
    async with client_for(args) as client:
        doc = await client.call("PUT", "/v1/registry", json_body=body)
    print(json.dumps(doc, indent=2))
    return 0


def _read_password(path: str | None) -> str:
    if path:
        return read_text("--password-file", path).strip()
    if sys.stdin.isatty():  # typed: asked for, and not echoed to the screen
        return getpass.getpass("registry password or token: ").strip()
    return sys.stdin.readline().strip()


async def registry_show(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        print(json.dumps(await client.call("GET", "/v1/registry"), indent=2))
    return 0


async def registry_remove(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        doc = await client.call("DELETE", "/v1/registry")
    if doc.get("removed") is False:
        print("no registry credentials were set: nothing changed")
    else:
        print(f"registry credentials removed (version {doc['version']})")
    return 0


async def nodes_list(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        doc = await client.call("GET", "/v1/nodes")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    headers = ("ID", "NAME", "LINK", "CREDENTIALS", "ENGINE", "ARCH", "LAST PULL")
    rows = [_node_row(node) for node in doc["nodes"]]
    print_table(headers, rows, empty=NO_WORKERS)
    return 0


NO_WORKERS = "no workers enrolled (`deploy-agent join-token` makes a token to enrol one)"


def _node_row(node: dict[str, Any]) -> tuple[str, ...]:
    last = node.get("last_pull") or {}
    pull = "-"
    if last:
        pull = f"{last.get('image', '?')} " + ("ok" if last.get("ok") else str(last.get("error")))
    return (
        node["id"],
        node["name"],
        "connected" if node["connected"] else "offline",
        f"v{node['credentials_version']}" if node.get("credentials_version") else "-",
        str(node.get("engine_version") or "-"),
        str(node.get("arch") or "-"),
        pull,
    )


async def nodes_revoke(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        await client.call("DELETE", f"/v1/nodes/{args.id}")
    print(f"node {args.id} revoked")
    return 0


async def join_token(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        doc = await client.call("POST", "/v1/join-tokens")
    print(doc["token"])
    return 0


async def bootstrap_host(args: argparse.Namespace) -> int:
    logs.configure("info", "auto")
    try:
        token = await asyncio.to_thread(_read_password, str(args.join_token_file))
        logs.redactor.add(token)
        plan = bootstrap_cmd.plan_from(args, token)
    except (OSError, ValueError) as exc:
        print(f"deploy-agent: bootstrap: {exc}", file=sys.stderr)
        return 2
    async with client_for(args) as client:
        try:
            from agent.bootstrap.runner import bootstrap  # noqa: PLC0415 (SSH only here)

            await bootstrap(plan, client)
        except BootstrapError as exc:
            print(f"deploy-agent: bootstrap failed at step {exc.step!r}: {exc}", file=sys.stderr)
            return 1
    return 0
