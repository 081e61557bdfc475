"""Entry point of `deploy-agent`: parses the command line and dispatches."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp

from agent import __version__, daemon, logs
from agent.bootstrap.runner import bootstrap
from agent.cli import bootstrap as bootstrap_cmd
from agent.cli import deploy as deploy_cmd
from agent.cli.client import ApiError, Client, Target
from agent.cli.live import LivePrinter
from agent.config import Config, load_config
from agent.errors import AgentError, BootstrapError, ConfigError
from agent.worker.agent import NodeRevoked

DEFAULT_CONFIG = "/etc/deploy-agent/config.toml"
EXIT_REVOKED = 3  # a revoked worker: restarting it cannot help
Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "command"):
        parser.print_help()
        raise SystemExit(2)
    try:
        raise SystemExit(asyncio.run(args.command(args)))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except ConfigError as exc:
        print(f"deploy-agent: config error: {exc.message}", file=sys.stderr)
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
        print(f"deploy-agent: cannot reach the leader: {exc!r}", file=sys.stderr)
        raise SystemExit(2) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deploy-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"deploy-agent {__version__}")
    sub = parser.add_subparsers()

    run = sub.add_parser("run", help="run the agent daemon")
    run.add_argument("-c", "--config", required=True)
    run.set_defaults(command=_run)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("-c", "--config", required=True)
    check.set_defaults(command=_check_config)

    dep = sub.add_parser("deploy", help="submit a deployment and follow it")
    _client_flags(dep)
    dep.add_argument("--app", required=True)
    source = dep.add_mutually_exclusive_group(required=True)
    source.add_argument("--context", type=Path, help="directory to send as the build context")
    source.add_argument("--git", help="git URL to build from")
    dep.add_argument("--ref", default="HEAD")
    dep.add_argument("--dockerfile")
    dep.add_argument("--image", help="repository to push to (default: from the registry)")
    dep.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE")
    dep.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    dep.add_argument(
        "--services",
        type=Path,
        metavar="FILE",
        help="JSON list of Swarm services to release: name, command, replicas, env, ...",
    )
    dep.add_argument("--prune", action="store_true", help="remove the app's unlisted services")
    dep.add_argument("--allow-manager-placement", action="store_true")
    dep.add_argument("--idempotency-key")
    dep.add_argument("--no-follow", action="store_true")
    dep.add_argument("--json", action="store_true", help="print events as JSON lines")
    dep.set_defaults(command=_deploy)

    status = sub.add_parser("status", help="list deployments, or show one")
    _client_flags(status)
    status.add_argument("id", nargs="?")
    status.add_argument("--app")
    status.add_argument("--state")
    status.add_argument("--limit", type=int, default=20)
    status.set_defaults(command=_status)

    cancel = sub.add_parser("cancel", help="cancel a deployment")
    _client_flags(cancel)
    cancel.add_argument("id")
    cancel.set_defaults(command=_cancel)

    _registry_parser(sub)
    _nodes_parser(sub)
    boot = bootstrap_cmd.add_parser(sub)
    _client_flags(boot)
    boot.set_defaults(command=_bootstrap)
    return parser


def _nodes_parser(sub: Any) -> None:
    nodes = sub.add_parser("nodes", help="list workers, or revoke one")
    _client_flags(nodes)
    nodes.add_argument("--json", action="store_true")
    nodes.set_defaults(command=_nodes_list)
    nodes_sub = nodes.add_subparsers()
    revoke = nodes_sub.add_parser("revoke", help="disconnect a worker and refuse it from now on")
    _client_flags(revoke)
    revoke.add_argument("id")
    revoke.set_defaults(command=_nodes_revoke)
    token = sub.add_parser("join-token", help="make a new worker join token (rotates the old)")
    _client_flags(token)
    token.set_defaults(command=_join_token)


def _registry_parser(sub: Any) -> None:
    reg = sub.add_parser("registry", help="registry credentials")
    reg_sub = reg.add_subparsers(required=True)
    put = reg_sub.add_parser("set", help="verify and store credentials")
    _client_flags(put)
    put.add_argument("--server", required=True)
    put.add_argument("--username", required=True)
    put.add_argument("--password-file", help="file with the password (default: read stdin)")
    put.add_argument("--namespace")
    put.set_defaults(command=_registry_set)
    for name, fn in (("show", _registry_show), ("remove", _registry_remove)):
        p = reg_sub.add_parser(name)
        _client_flags(p)
        p.set_defaults(command=fn)


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help=f"leader config (default {DEFAULT_CONFIG})")
    parser.add_argument("--url", help="leader URL (or DEPLOY_AGENT_URL)")
    parser.add_argument("--token-file", help="file with the API token (or DEPLOY_AGENT_TOKEN)")
    parser.add_argument("--ca-file", help="CA to verify the leader with (or DEPLOY_AGENT_CA)")


def _client(args: argparse.Namespace) -> Client:
    path = args.config or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None)
    config: Config | None = load_config(path) if path else None
    return Client(Target.resolve(args.url, args.token_file, config, args.ca_file))


async def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    logs.configure(config.log.level, config.log.format)
    try:
        await daemon.run(config)
    except NodeRevoked as exc:
        logs.get_logger("agent").error("agent.revoked", error=exc.message)
        return EXIT_REVOKED
    except AgentError as exc:
        logs.get_logger("agent").error("agent.failed", error=exc.message)
        return 1
    return 0


async def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: ok (role {config.role})")
    return 0


async def _deploy(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        if args.context is not None:
            if not args.context.is_dir():
                raise SystemExit(f"deploy-agent: {args.context} is not a directory")
            params = deploy_cmd.query_params(
                args.app, args.dockerfile, args.image, args.build_arg, args.label
            ) + _release_params(args)
            dep = await deploy_cmd.submit_directory(
                client, args.context, params, args.idempotency_key
            )
        else:
            body = _git_body(args)
            dep = await deploy_cmd.submit_git(client, body, args.idempotency_key)
        print(f"deployment {dep['id']} submitted ({dep['mode']} mode)", file=sys.stderr)
        if args.no_follow:
            return 0
        final = await _follow_until_done_or_detached(client, dep["id"], args.json)
    if final is None:
        return 130
    return 0 if final["state"] == "succeeded" else 1


async def _follow_until_done_or_detached(
    client: Client, dep_id: str, as_json: bool
) -> dict[str, Any] | None:
    """Follow the deployment; Ctrl-C detaches (and on a terminal offers to cancel)."""
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    tty = sys.stdout.isatty() and not as_json
    with contextlib.ExitStack() as stack:
        printer: deploy_cmd.EventSink = (
            stack.enter_context(LivePrinter()) if tty else deploy_cmd.Printer(as_json=as_json)
        )
        following = asyncio.create_task(deploy_cmd.follow(client, dep_id, printer))
        stop = asyncio.create_task(interrupted.wait())
        await asyncio.wait([following, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        loop.remove_signal_handler(signal.SIGINT)
        if following.done():
            return following.result()
        following.cancel()
    print(f"\ndetached: deployment {dep_id} goes on", file=sys.stderr)
    if sys.stdin.isatty():
        answer = await asyncio.to_thread(input, "cancel it? [y/N] ")
        if answer.strip().lower() in ("y", "yes"):
            doc = await client.call("POST", f"/v1/deployments/{dep_id}/cancel")
            print(f"deployment {dep_id}: {doc['state']}", file=sys.stderr)
    return None


def _services(args: argparse.Namespace) -> list[Any] | None:
    if args.services is None:
        return None
    services = json.loads(args.services.read_text())
    if not isinstance(services, list):
        raise SystemExit(f"deploy-agent: {args.services} must hold a JSON list of services")
    return services


def _release_params(args: argparse.Namespace) -> list[tuple[str, str]]:
    params = []
    services = _services(args)
    if services is not None:
        params.append(("services", json.dumps(services)))
    params += [
        (flag, "true") for flag in ("prune", "allow_manager_placement") if getattr(args, flag)
    ]
    return params


def _git_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"app": args.app, "git": {"url": args.git, "ref": args.ref}}
    if args.dockerfile:
        body["dockerfile"] = args.dockerfile
    if args.image:
        body["image"] = args.image
    body["build_args"] = dict(item.partition("=")[::2] for item in args.build_arg)
    body["labels"] = dict(item.partition("=")[::2] for item in args.label)
    services = _services(args)
    if services is not None:
        body["services"] = services
    body["prune"] = args.prune
    body["allow_manager_placement"] = args.allow_manager_placement
    return body


async def _status(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        if args.id:
            print(json.dumps(await client.call("GET", f"/v1/deployments/{args.id}"), indent=2))
            return 0
        params = {"limit": args.limit} | {k: v for k in ("app", "state") if (v := getattr(args, k))}
        doc = await client.call("GET", "/v1/deployments", params=params)
    for dep in doc["deployments"]:
        error = dep.get("error") or {}
        print(
            f"{dep['id']}  {dep['app']:<20} {dep['state']:<12} {dep['mode']:<8} "
            f"{dep['image']}  {error.get('code', '')}"
        )
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        dep = await client.call("POST", f"/v1/deployments/{args.id}/cancel")
    print(f"deployment {dep['id']}: {dep['state']}")
    return 0


async def _registry_set(args: argparse.Namespace) -> int:
    password = await asyncio.to_thread(_read_password, args.password_file)
    body = {"server": args.server, "username": args.username, "password": password}
    if args.namespace:
        body["namespace"] = args.namespace
    async with _client(args) as client:
        doc = await client.call("PUT", "/v1/registry", json_body=body)
    print(json.dumps(doc, indent=2))
    return 0


def _read_password(path: str | None) -> str:
    return Path(path).read_text().strip() if path else sys.stdin.readline().strip()


async def _registry_show(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        print(json.dumps(await client.call("GET", "/v1/registry"), indent=2))
    return 0


async def _registry_remove(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        print(json.dumps(await client.call("DELETE", "/v1/registry"), indent=2))
    return 0


async def _nodes_list(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        doc = await client.call("GET", "/v1/nodes")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    for node in doc["nodes"]:
        state = "connected" if node["connected"] else "offline"
        last = node.get("last_pull") or {}
        print(
            f"{node['id']}  {node['name']:<20} {state:<10} creds v{node['credentials_version']}"
            f"  engine {node['engine_version']} {node['arch']}  last pull: "
            f"{last.get('image', '-')} {'ok' if last.get('ok') else last.get('error', '')}"
        )
    return 0


async def _nodes_revoke(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        await client.call("DELETE", f"/v1/nodes/{args.id}")
    print(f"node {args.id} revoked")
    return 0


async def _join_token(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        doc = await client.call("POST", "/v1/join-tokens")
    print(doc["token"])
    return 0


async def _bootstrap(args: argparse.Namespace) -> int:
    logs.configure("info", "auto")
    try:
        token = await asyncio.to_thread(_read_password, str(args.join_token_file))
        logs.redactor.add(token)
        plan = bootstrap_cmd.plan_from(args, token)
    except (OSError, ValueError) as exc:
        print(f"deploy-agent: bootstrap: {exc}", file=sys.stderr)
        return 2
    async with _client(args) as client:
        try:
            await bootstrap(plan, client)
        except BootstrapError as exc:
            print(f"deploy-agent: bootstrap failed at step {exc.step!r}: {exc}", file=sys.stderr)
            return 1
    return 0
