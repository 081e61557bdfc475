"""`deploy-agent upgrade`: roll a new agent release out to the workers, one node at a
time, and follow it live."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, TextIO

from agent.cli.client import UPLOAD_TIMEOUT, Client
from agent.cli.commands import client_for
from agent.cli.deploy import follow_events
from agent.cli.inputs import InputError


def add_parser(sub: Any) -> argparse.ArgumentParser:
    up: argparse.ArgumentParser = sub.add_parser(
        "upgrade",
        help="roll a new agent release out to the workers, one node at a time",
        description="Send a new release's wheel (and its dependencies' wheels) to the "
        "leader, which upgrades the workers one at a time over their links and waits for "
        "each to come back with it. A node that fails returns to its previous release by "
        "itself, and the rollout stops there. Upgrade the leader first.",
    )
    up.add_argument("--wheel", type=Path, required=True, help="the deploy-agent wheel")
    up.add_argument(
        "--wheelhouse",
        type=Path,
        help="directory of the dependencies' wheels, for workers without a package index",
    )
    up.add_argument(
        "--nodes", help="comma-separated node names, in order (default: every node, by name)"
    )
    up.add_argument(
        "--node-timeout",
        type=float,
        default=120.0,
        help="seconds each node has to come back with the release (default: %(default)s)",
    )
    up.add_argument("--no-follow", action="store_true", help="submit and return at once")
    up.add_argument("--json", action="store_true", help="print events as JSON lines")
    up.set_defaults(command=command)
    return up


def wheels_of(wheel: Path, wheelhouse: Path | None) -> list[Path]:
    """The files to send: the agent's wheel, then the dependency wheels beside it."""
    if not wheel.is_file() or not wheel.name.startswith("deploy_agent-"):
        raise InputError(f"--wheel: {wheel} is not a deploy-agent wheel")
    if wheelhouse is None:
        return [wheel]
    if not wheelhouse.is_dir():
        raise InputError(f"--wheelhouse: {wheelhouse} is not a directory")
    found = sorted(p for p in wheelhouse.glob("*.whl") if not p.name.startswith("deploy_agent-"))
    if not found:
        raise InputError(f"--wheelhouse: {wheelhouse} holds no wheels")
    return [wheel, *found]


def _pack(files: list[Path], dest: Path) -> None:
    with tarfile.open(dest, "w") as archive:  # wheels are zip files already
        for path in files:
            archive.add(path, arcname=path.name)


async def command(args: argparse.Namespace) -> int:
    files = wheels_of(args.wheel, args.wheelhouse)
    params = {"node_timeout": str(args.node_timeout)}
    if args.nodes:
        params["nodes"] = args.nodes
    async with client_for(args) as client:
        with tempfile.TemporaryDirectory(prefix="deploy-agent-") as tmp:
            archive = Path(tmp) / "release.tar"
            await asyncio.to_thread(_pack, files, archive)
            with archive.open("rb") as body:
                rollout: dict[str, Any] = await client.call(
                    "POST",
                    "/v1/upgrades",
                    params=params,
                    data=body,
                    limits=UPLOAD_TIMEOUT,
                    headers={"Content-Type": "application/x-tar"},
                )
        names = ", ".join(step["name"] for step in rollout["steps"])
        print(
            f"upgrade {rollout['id']}: deploy-agent {rollout['version']} to "
            f"{len(rollout['steps'])} node(s), one at a time: {names}",
            file=sys.stderr,
        )
        if args.no_follow:
            return 0
        final = await follow(client, rollout["id"], sys.stdout, as_json=args.json)
    return 0 if final["state"] == "succeeded" else 1


async def follow(client: Client, rollout_id: str, out: TextIO, *, as_json: bool) -> dict[str, Any]:
    """Print the upgrade's events to its end (across a leader restart); its final record."""

    def show(event: dict[str, Any]) -> None:
        text = event_line(event, as_json=as_json)
        if text is not None:
            print(text, file=out, flush=True)

    await follow_events(client, rollout_id, show, kind="upgrades")
    final: dict[str, Any] = await client.call("GET", f"/v1/upgrades/{rollout_id}")
    return final


def event_line(event: dict[str, Any], *, as_json: bool = False) -> str | None:
    """One event as a line of text (None: nothing worth a line)."""
    if as_json:
        return json.dumps(event)
    kind = event.get("type")
    if kind == "node":
        return _node_line(event)
    if kind == "progress":
        detail = f" {event['detail']}" if event.get("detail") else ""
        return f"{event['node']}: {event['state']}{detail}"
    if kind == "resumed":
        return "the leader restarted: the upgrade goes on"
    if kind == "state" and event.get("state") != "running":
        counts = ", ".join(f"{n} {status}" for status, n in (event.get("counts") or {}).items())
        error = f": {event['error']}" if event.get("error") else ""
        return f"upgrade {event['state']} ({counts}){error}"
    return None


def _node_line(event: dict[str, Any]) -> str:
    status, node = event["status"], event["node"]
    if status == "upgrading":
        return f"{node}: upgrading from {event.get('from') or '?'} to {event['to']}"
    took = f" in {event['seconds']:.1f} s" if event.get("seconds") is not None else ""
    detail = f": {event['detail']}" if event.get("detail") else ""
    return f"{node}: {status}{took}{detail}"
