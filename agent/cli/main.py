"""Entry point of `deploy-agent`: parses the command line and dispatches to the command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp

from agent import __version__
from agent.cli import bootstrap as bootstrap_cmd
from agent.cli import commands
from agent.cli import deploy as deploy_cmd
from agent.cli import releases as releases_cmd
from agent.cli import upgrade as upgrade_cmd
from agent.cli.client import ApiError, describe
from agent.cli.inputs import InputError
from agent.errors import ConfigError
from agent.eventloop import daemon_loop

STATES = (
    "queued", "building", "pushing", "distributing", "releasing",
    "succeeded", "failed", "cancelled",
)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "command"):
        parser.print_help()
        raise SystemExit(2)
    try:
        loop = args.loop() if hasattr(args, "loop") else None
        with asyncio.Runner(loop_factory=loop) as runner:
            raise SystemExit(runner.run(args.command(args)))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except ConfigError as exc:
        for problem in exc.message.splitlines():  # each problem found, a line each
            print(f"deploy-agent: config error: {problem}", file=sys.stderr)
        raise SystemExit(2) from None
    except InputError as exc:
        print(f"deploy-agent: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except ApiError as exc:
        print(f"deploy-agent: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except BrokenPipeError:
        # stdout's reader went away (`deploy-agent status | head`): stop quietly, as
        # other tools do, and keep Python from complaining when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        print(f"deploy-agent: cannot reach the leader: {describe(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deploy-agent",
        description="The node agent of a Docker Swarm cluster: `run` is the daemon (leader or "
        "worker); the other commands drive a leader from a shell.",
        epilog="Exit codes: 0 ok, 1 failed, 2 usage or config error (or the leader "
        "unreachable), 3 revoked worker, 4 worker newer than its leader. "
        "`deploy-agent COMMAND --help` for a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"deploy-agent {__version__}")
    sub = parser.add_subparsers()

    run = sub.add_parser("run", help="run the agent daemon")
    run.add_argument("-c", "--config", required=True, help="the agent's config file (TOML)")
    run.set_defaults(command=commands.run, loop=daemon_loop)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("-c", "--config", required=True, help="the config file to check")
    check.set_defaults(command=commands.check_config)

    dep = sub.add_parser("deploy", help="submit a deployment and follow it")
    _client_flags(dep)
    dep.add_argument("--app", required=True, help="the app's name (lowercase, digits, '-')")
    source = dep.add_mutually_exclusive_group(required=True)
    source.add_argument("--context", type=Path, help="directory to send as the build context")
    source.add_argument("--git", help="git URL to build from")
    source.add_argument(
        "--prebuilt",
        metavar="REF",
        help="an image built elsewhere: on the configured registry (a tag is pinned to its "
        "digest), or, with no registry, on the leader's engine",
    )
    dep.add_argument(
        "--git-password-file",
        help="file with the git token for --git (or DEPLOY_AGENT_GIT_PASSWORD): kept off "
        "the command line, sent in the request body",
    )
    dep.add_argument("--ref", default="HEAD", help="branch, tag or commit of --git (default: HEAD)")
    dep.add_argument(
        "--dockerfile", help="the Dockerfile's path inside the context (default: Dockerfile)"
    )
    dep.add_argument("--target", help="the Dockerfile stage to build (default: the last)")
    dep.add_argument(
        "--compress", action="store_true", help="gzip the context for a slow link to the leader"
    )
    dep.add_argument("--image", help="repository to push to (default: from the registry)")
    dep.add_argument(
        "--build-arg", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    dep.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="image label, repeatable"
    )
    dep.add_argument(
        "--services",
        type=Path,
        metavar="FILE",
        help="JSON list of Swarm services to release: name, command, replicas, env, ...",
    )
    dep.add_argument("--prune", action="store_true", help="remove the app's unlisted services")
    dep.add_argument(
        "--allow-manager-placement",
        action="store_true",
        help="let the services run on Swarm managers too (with workers enrolled)",
    )
    dep.add_argument(
        "--idempotency-key", help="a retry with the same key returns the first deployment"
    )
    dep.add_argument(
        "--no-follow", action="store_true", help="return once the leader has accepted it"
    )
    dep.add_argument("--json", action="store_true", help="print events as JSON lines")
    dep.set_defaults(command=deploy_cmd.command)

    status = sub.add_parser("status", help="list deployments, or show one")
    _client_flags(status)
    status.add_argument("id", nargs="?", help="one deployment, shown as JSON")
    status.add_argument("--app", help="only this app's deployments")
    status.add_argument(
        "--state",
        choices=STATES,
        help="only deployments in this state",
    )
    status.add_argument("--limit", type=int, default=20, help="at most this many (default: 20)")
    status.add_argument("--json", action="store_true", help="the API's JSON document")
    status.set_defaults(command=commands.status)

    cancel = sub.add_parser("cancel", help="cancel a deployment")
    _client_flags(cancel)
    cancel.add_argument("id", help="the deployment's id")
    cancel.set_defaults(command=commands.cancel)

    _registry_parser(sub)
    _nodes_parser(sub)
    _client_flags(upgrade_cmd.add_parser(sub))
    _releases_parser(sub)
    boot = bootstrap_cmd.add_parser(sub)
    _client_flags(boot)
    boot.set_defaults(command=commands.bootstrap_host)
    return parser


def _releases_parser(sub: Any) -> None:
    apps = sub.add_parser("apps", help="list apps and their current release")
    _client_flags(apps)
    apps.add_argument("--json", action="store_true", help="the API's JSON document")
    apps.set_defaults(command=releases_cmd.apps)

    history = sub.add_parser("history", help="an app's releases, newest first")
    _client_flags(history)
    history.add_argument("app", help="the app's name")
    history.add_argument(
        "--limit", type=int, default=20, help="at most this many releases (default: 20)"
    )
    history.add_argument("--json", action="store_true", help="the API's JSON document")
    history.set_defaults(command=releases_cmd.history)

    back = sub.add_parser("rollback", help="redeploy an earlier release, and follow it")
    _client_flags(back)
    back.add_argument("app", help="the app to roll back")
    back.add_argument("--to", metavar="ID", help="the release (default: the one before)")
    back.add_argument(
        "--idempotency-key", help="a retry with the same key returns the first rollback"
    )
    back.add_argument("--no-follow", action="store_true", help="return once the leader accepted it")
    back.add_argument("--json", action="store_true", help="print events as JSON lines")
    back.set_defaults(command=releases_cmd.rollback)


def _nodes_parser(sub: Any) -> None:
    nodes = sub.add_parser("nodes", help="list workers, or revoke one")
    _client_flags(nodes)
    nodes.add_argument("--json", action="store_true", help="the API's JSON document")
    nodes.set_defaults(command=commands.nodes_list)
    nodes_sub = nodes.add_subparsers()
    revoke = nodes_sub.add_parser("revoke", help="disconnect a worker and refuse it from now on")
    _client_flags(revoke, nested=True)
    revoke.add_argument("id", help="the node's id (`deploy-agent nodes` lists them)")
    revoke.set_defaults(command=commands.nodes_revoke)
    token = sub.add_parser("join-token", help="make a new worker join token (rotates the old)")
    _client_flags(token)
    token.set_defaults(command=commands.join_token)


def _registry_parser(sub: Any) -> None:
    reg = sub.add_parser(
        "registry",
        help="the cluster's registry credentials: set, show, remove",
        description="The cluster's registry credentials: `set` verifies and stores them "
        "(the password from stdin or --password-file), `show` prints them without the "
        "password, `remove` deletes them (back to local mode, if no worker is enrolled).",
    )
    reg_sub = reg.add_subparsers(required=True, metavar="{set,show,remove}")
    put = reg_sub.add_parser("set", help="verify and store credentials")
    _client_flags(put)
    put.add_argument("--server", required=True, help="the registry's host (ghcr.io, ...)")
    put.add_argument("--username", required=True, help="the registry user")
    put.add_argument("--password-file", help="file with the password (default: read stdin)")
    put.add_argument("--namespace", help="where images go (default: the username)")
    put.set_defaults(command=commands.registry_set)
    for name, fn, what in (
        ("show", commands.registry_show, "the credentials in force, without the password"),
        ("remove", commands.registry_remove, "remove the credentials"),
    ):
        p = reg_sub.add_parser(name, help=what, description=what)
        _client_flags(p)
        p.set_defaults(command=fn)


def _client_flags(parser: argparse.ArgumentParser, *, nested: bool = False) -> None:
    """The flags that say which leader to talk to. On a nested command (`nodes revoke`)
    they leave unset what the parent command's copies already set."""
    extra: dict[str, Any] = {"default": argparse.SUPPRESS} if nested else {}
    add = parser.add_argument
    add("-c", "--config", help=f"leader config (default {commands.DEFAULT_CONFIG})", **extra)
    add("--url", help="leader URL (or DEPLOY_AGENT_URL)", **extra)
    add("--token-file", help="file with the API token (or DEPLOY_AGENT_TOKEN)", **extra)
    add("--ca-file", help="CA to verify the leader with (or DEPLOY_AGENT_CA)", **extra)
