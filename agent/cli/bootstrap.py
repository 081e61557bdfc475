"""`deploy-agent bootstrap`: its flags, and the plan they make."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from agent.bootstrap.plan import Plan
from agent.ssh_target import SshTarget

DEFAULTS = {field.name: field.default for field in dataclasses.fields(Plan)}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    boot: argparse.ArgumentParser = sub.add_parser(
        "bootstrap",
        help="install and enrol a worker on a host over SSH",
        description="Install deploy-agent on a host over SSH, enrol it as a worker, and "
        "wait until the leader shows it connected. Safe to run again.",
    )
    boot.add_argument("target", metavar="ssh://USER@HOST[:PORT]", help="the host to install")
    boot.add_argument("--role", choices=["worker"], required=True, help="what the host becomes")
    boot.add_argument("--leader-url", required=True, help="the leader's URL, as the host sees it")
    boot.add_argument(
        "--join-token-file",
        required=True,
        type=Path,
        help="file with a join token (`deploy-agent join-token > FILE`)",
    )
    boot.add_argument("--name", help="node name (default: the host's hostname)")
    boot.add_argument(
        "--known-hosts",
        type=Path,
        default=Path("~/.ssh/known_hosts"),
        help="the host keys to check the host's against (default: %(default)s)",
    )
    boot.add_argument("--identity", type=Path, help="SSH private key (default: agent, ~/.ssh)")
    boot.add_argument("--wheel", type=Path, help="deploy-agent wheel (default: build one)")
    boot.add_argument(
        "--wheelhouse", type=Path, help="directory of dependency wheels: install without an index"
    )
    for flag, field in (
        ("--prefix", "prefix"),
        ("--config-dir", "config_dir"),
        ("--state-dir", "state_dir"),
        ("--unit-dir", "unit_dir"),
        ("--engine-url", "engine_url"),
    ):
        boot.add_argument(flag, default=DEFAULTS[field], help="default: %(default)s")
    boot.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the link")
    return boot


def plan_from(args: argparse.Namespace, join_token: str) -> Plan:
    """The plan the flags describe; ValueError says which flag is wrong."""
    return Plan(
        target=SshTarget.parse(args.target),
        leader_url=args.leader_url,
        join_token=join_token,
        known_hosts=args.known_hosts.expanduser(),
        identity=args.identity.expanduser() if args.identity else None,
        name=args.name,
        wheel=args.wheel,
        wheelhouse=args.wheelhouse,
        prefix=args.prefix,
        config_dir=args.config_dir,
        state_dir=args.state_dir,
        unit_dir=args.unit_dir,
        engine_url=args.engine_url,
        wait_seconds=args.wait,
    )
