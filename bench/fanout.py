"""Fan-out latency of the worker hub: a pull order and a credentials broadcast to N workers.

    python -m bench.fanout --workers 1000 [--tls] [--stuck] [--rounds 5]

A real leader runs in this process (no Docker Engine needed for the hub path); the
workers are simulated by bench.simworkers in separate processes, speaking the real
protocol over real websockets. Latency is from the leader issuing the order (or the
broadcast) to the leader having handled each worker's acknowledgement. With --stuck,
one more client stops reading once connected and is sent orders until its socket
buffers are full; its figures are left out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from agent import wire
from agent.credentials import RegistryCredentials
from agent.leader.hub import Hub
from agent.leader.server import GC_YOUNG_THRESHOLD, tune_collector
from bench.fleet import (
    Fleet,
    bench_main,
    bench_parser,
    ensure_enrolled,
    log_to_file,
    raw_config,
    wait_for,
)
from bench.probe import AckProbe, GcPauses, summary
from bench.simworkers import raise_fd_limit
from tests.support.leader import InProcessLeader

IMAGE = "registry.bench:5000/bench/app@sha256:" + "0" * 64
ROUND_TIMEOUT = 120.0
# Orders to the stuck worker, ~4 KiB each: ~4.5 MiB, past what the kernel buffers on
# loopback (tcp_wmem up to 4 MiB), so its link's sender stalls with orders queued.
FILL = 1100


async def pull_round(hub: Hub, probe: AckProbe, node_ids: set[str], expected: int) -> list[float]:
    order = "bench-" + uuid.uuid4().hex[:12]
    probe.expect(lambda m: isinstance(m, wire.PullResult) and m.order == order, expected)
    nodes = [node for node in await _records(hub) if node.id in node_ids]
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


async def _records(hub: Hub) -> list[Any]:
    return await hub._store.nodes()


async def measure(
    hub: Hub, fleet: Fleet, node_ids: set[str], expected: int, rounds: int
) -> dict[str, Any]:
    probe = AckProbe(hub)
    await pull_round(hub, probe, node_ids, expected)  # warm-up, not counted
    pulls: list[float] = []
    creds: list[float] = []
    cpu, fleet_cpu = os.times(), fleet.cpu_seconds()
    with GcPauses() as gc_pauses:
        for r in range(rounds):
            pulls += await pull_round(hub, probe, node_ids, expected)
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


async def fill(hub: Hub, stuck: str) -> list[asyncio.Task[Any]]:
    """Send the stuck worker enough orders to fill its socket buffers and stall its link's
    sender, leaving fewer queued than the send queue holds."""
    node = next(node for node in await _records(hub) if node.id == stuck)
    pad = "x" * 4000  # order ids may be 4096 characters long
    tasks = []
    for i in range(FILL):
        tasks.append(asyncio.create_task(hub.pull_everywhere(f"fill-{i}-{pad}", IMAGE, [node])))
        if i % 100 == 99:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    return tasks


def _backlog(hub: Hub, node_id: str) -> int | None:
    """Messages queued on a link behind a send that cannot finish (None: link gone)."""
    link = hub._links.get(node_id)
    return None if link is None else link.queue.qsize()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    state: Path = args.state
    stuck = 1 if args.stuck else 0
    total = args.workers + stuck
    work = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    log_to_file(work / "leader.log")
    enrolled = await ensure_enrolled(state, total)
    leader = await InProcessLeader(raw_config(state, tls=args.tls)).start()
    if args.gc_young:
        tune_collector(args.gc_young)  # as `deploy-agent run` does once the leader is up
    fleet = Fleet(work, leader.url, enrolled, total, args.procs)
    try:
        assert leader.leader.ctx is not None
        hub = leader.leader.ctx.hub
        fleet.start(stuck=stuck, tls=args.tls)
        await wait_for(lambda: hub.connected_count >= total, 300, f"{total} workers connected")
        await asyncio.sleep(1.0)  # let every Sync be answered
        ids = {node_id for node_id, _ in enrolled.nodes[:total]}
        filling = await fill(hub, fleet.stuck_node()) if stuck else []
        backlog = _backlog(hub, fleet.stuck_node()) if stuck else None
        figures = await measure(hub, fleet, ids, args.workers, args.rounds)
        figures["stuck_still_connected"] = hub.connected(fleet.stuck_node()) if stuck else None
        figures["stuck_backlog_after_fill"] = backlog
        for task in filling:
            task.cancel()
        await asyncio.gather(*filling, return_exceptions=True)
    finally:
        fleet.stop()
        await leader.stop()
    return {
        "workers": args.workers,
        "tls": args.tls,
        "stuck": args.stuck,
        "leader_uvloop": args.leader_uvloop,
        **figures,
    }


def render(result: dict[str, Any]) -> str:
    mode = ("TLS" if result["tls"] else "plain") + (" +stuck" if result["stuck"] else "")
    mode += ", leader on uvloop" if result["leader_uvloop"] else ""
    lines = [f"{result['workers']} workers, {mode}"]
    for kind in ("pull", "credentials"):
        s = result[kind]
        lines.append(
            f"  {kind:<12} n={int(s['n']):>6}  p50 {s['p50_ms']:8.1f} ms  p95 {s['p95_ms']:8.1f} ms"
            f"  p99 {s['p99_ms']:8.1f} ms  max {s['max_ms']:8.1f} ms"
        )
    if result["stuck"]:
        lines.append(
            f"  stuck worker: {result['stuck_backlog_after_fill']} orders queued behind its"
            f" stalled send; still connected at the end: {result['stuck_still_connected']}"
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
    parser.add_argument("--stuck", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--gc-young",
        type=int,
        default=GC_YOUNG_THRESHOLD,
        help="the leader's collector tuning as deployed; 0 leaves Python's defaults",
    )
    parser.add_argument(
        "--leader-uvloop", action="store_true", help="run the leader on uvloop (not as deployed)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    bench_main(parse(argv), run, render)


if __name__ == "__main__":
    main()
