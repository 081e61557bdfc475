"""Fan-out latency of the worker hub: a pull order and a credentials broadcast to N workers.

    python -m bench.fanout --workers 1000 [--tls] [--rounds 5]

A real leader runs in this process (no Docker Engine needed for the hub path); the
workers are simulated by bench.simworkers in separate processes, speaking the real
protocol over real websockets. Latency is from the leader issuing the order (or the
broadcast) to the leader having handled each worker's acknowledgement. bench.stuck
measures the same with one worker that stops reading.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from typing import Any

from agent import wire
from agent.credentials import RegistryCredentials
from agent.eventloop import loop_name
from agent.leader.links.hub import Hub
from agent.leader.server import GC_YOUNG_THRESHOLD
from agent.leader.state.models import NodeRecord
from bench.fleet import (
    Fleet,
    bench_main,
    bench_parser,
    connected_fleet,
)
from bench.probe import AckProbe, GcPauses, summary

IMAGE = "registry.bench:5000/bench/app@sha256:" + "0" * 64
ROUND_TIMEOUT = 120.0


async def pull_round(
    hub: Hub, probe: AckProbe, nodes: list[NodeRecord], expected: int
) -> list[float]:
    order = "bench-" + uuid.uuid4().hex[:12]
    probe.expect(lambda m: isinstance(m, wire.PullResult) and m.order == order, expected)
    started = time.perf_counter()
    task = asyncio.create_task(hub.pull_everywhere(order, IMAGE, nodes))
    try:
        return await probe.latencies(started, within=ROUND_TIMEOUT)
    finally:
        if expected < len(nodes):  # a stuck worker never answers: stop waiting for it
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def credentials_round(hub: Hub, probe: AckProbe, version: int, expected: int) -> list[float]:
    creds = RegistryCredentials("registry.bench:5000", "bench", "bench-pw", None, version)
    probe.expect(lambda m: isinstance(m, wire.CredentialsAck) and m.version == version, expected)
    started = time.perf_counter()
    hub.set_credentials(creds, version)
    return await probe.latencies(started, within=ROUND_TIMEOUT)


async def records(hub: Hub, node_ids: set[str]) -> list[NodeRecord]:
    """The nodes to order, read once: a read of the node table costs the leader's process
    CPU that would count against every round it came before."""
    return [node for node in await hub._store.nodes() if node.id in node_ids]


async def measure(
    hub: Hub, fleet: Fleet, node_ids: set[str], expected: int, rounds: int
) -> dict[str, Any]:
    probe = AckProbe(hub)
    nodes = await records(hub, node_ids)
    await pull_round(hub, probe, nodes, expected)  # warm-up, not counted
    pulls: list[float] = []
    creds: list[float] = []
    cpu, fleet_cpu = os.times(), fleet.cpu_seconds()
    with GcPauses() as gc_pauses:
        for r in range(rounds):
            pulls += await pull_round(hub, probe, nodes, expected)
            await asyncio.sleep(0.3)
            creds += await credentials_round(hub, probe, 10_000 + r, expected)
            await asyncio.sleep(0.3)
    spent = os.times()
    acks = len(pulls) + len(creds)
    user_us = (spent.user - cpu.user) / acks * 1e6
    system_us = (spent.system - cpu.system) / acks * 1e6
    fleet_us = (fleet.cpu_seconds() - fleet_cpu) / acks * 1e6
    return {
        "pull": summary(pulls),
        "credentials": summary(creds),
        "cpu_us_per_ack": user_us + system_us,
        "user_us_per_ack": user_us,
        "system_us_per_ack": system_us,
        "fleet_cpu_us_per_ack": fleet_us,
        "gc": gc_pauses.figures(),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with connected_fleet(args, args.workers, gc_young=args.gc_young) as (hub, fleet, ids):
        figures = await measure(hub, fleet, set(ids), args.workers, args.rounds)
    return {
        "workers": args.workers,
        "tls": args.tls,
        "event_loop": loop_name(),
        **figures,
    }


def render(result: dict[str, Any]) -> str:
    mode = "TLS" if result["tls"] else "plain"
    mode += f", leader on {result['event_loop']}"
    lines = [f"{result['workers']} workers, {mode}"]
    for kind in ("pull", "credentials"):
        s = result[kind]
        lines.append(
            f"  {kind:<12} n={int(s['n']):>6}  p50 {s['p50_ms']:8.1f} ms  p95 {s['p95_ms']:8.1f} ms"
            f"  p99 {s['p99_ms']:8.1f} ms  max {s['max_ms']:8.1f} ms"
        )
    lines.append(
        f"  leader CPU per acknowledgement: {result['cpu_us_per_ack']:.0f} us"
        f" ({result['user_us_per_ack']:.0f} user, {result['system_us_per_ack']:.0f} system);"
        f" simulated workers' CPU: {result['fleet_cpu_us_per_ack']:.0f} us"
    )
    gc = result["gc"]
    lines.append(
        f"  collector: {int(gc['collections'])} runs, {gc['total_ms']:.0f} ms in all;"
        f" {int(gc['full_collections'])} full, {gc['full_total_ms']:.0f} ms,"
        f" longest {gc['full_max_ms']:.0f} ms"
    )
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, workers=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--gc-young",
        type=int,
        default=GC_YOUNG_THRESHOLD,
        help="the leader's collector tuning as deployed; 0 leaves Python's defaults",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    bench_main(parse(argv), run, render)


if __name__ == "__main__":
    main()
