"""Leader memory per idle worker link, and across many connect/disconnect cycles.

    python -m bench.memory --workers 1000 [--tls] [--cycles 10000] [--deflate]

The leader is a real `deploy-agent run` process (no Docker Engine needed); its RSS is
read from /proc before and after N simulated workers connect and sit idle. Then clients
connect, sync and disconnect, 100 at a time, `--cycles` times in all; RSS is reported at
the start, the middle and the end, and once more after the leader's next periodic heap
trim (`leader.memory_trim_interval`, set to 60 s here, its default). --deflate makes the
clients offer permessage-deflate.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from bench.fleet import (
    Enrolled,
    Fleet,
    bench_main,
    bench_parser,
    ensure_enrolled,
    log_to_file,
    raw_config,
    wait_for,
)
from bench.leaderlog import count, links_up, rss_kib
from bench.scratch import scratch_dir
from bench.simworkers import raise_fd_limit
from tests.support.leader import LeaderProcess

CHURN_CLIENTS = 100
SETTLE_S = 5.0
TRIM_INTERVAL_S = 60.0  # the leader's memory_trim_interval: the bench sets it


async def idle_links(
    leader: LeaderProcess, fleet: Fleet, tls: bool, deflate: bool
) -> dict[str, Any]:
    pid, log = _pid(leader), leader.log_path
    await asyncio.sleep(SETTLE_S)
    before = rss_kib(pid)
    fleet.start(tls=tls, deflate=deflate)
    await wait_for(lambda: links_up(log) >= fleet.count, 300, "all links up", every=0.5)
    await asyncio.sleep(SETTLE_S)
    after = rss_kib(pid)
    fleet.stop()
    await wait_for(lambda: links_up(log) == 0, 60, "all links down", every=0.5)
    return {
        "rss_before_kib": before,
        "rss_connected_kib": after,
        "kib_per_link": (after - before) / fleet.count,
    }


async def churn(leader: LeaderProcess, fleet: Fleet, cycles: int, tls: bool) -> dict[str, Any]:
    pid, log = _pid(leader), leader.log_path
    await asyncio.sleep(SETTLE_S)
    start, done_before = rss_kib(pid), count(log, "link.disconnected")

    def done() -> int:
        return count(log, "link.disconnected") - done_before

    fleet.start(tls=tls, cycles=cycles // fleet.count)
    await wait_for(lambda: done() >= cycles // 2, 900, "half the cycles", every=0.5)
    middle = rss_kib(pid)
    await wait_for(lambda: done() >= cycles, 900, "all cycles", every=0.5)
    fleet.wait(60)
    await asyncio.sleep(SETTLE_S)
    end = rss_kib(pid)
    await asyncio.sleep(TRIM_INTERVAL_S + SETTLE_S)  # one heap trim of the leader's, at least
    return {
        "cycles": done(),
        "rss_start_kib": start,
        "rss_middle_kib": middle,
        "rss_end_kib": end,
        "rss_trimmed_kib": rss_kib(pid),
    }


def _pid(leader: LeaderProcess) -> int:
    assert leader.proc is not None
    return leader.proc.pid


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    with scratch_dir("bench-memory-") as work:
        return await _run(args, work)


async def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    log_to_file(work / "bench.log")
    enrolled: Enrolled = await ensure_enrolled(args.state, max(args.workers, CHURN_CLIENTS))
    config = raw_config(args.state, tls=args.tls, memory_trim_interval=TRIM_INTERVAL_S)
    leader = LeaderProcess(config, work)
    leader.start()
    try:
        url = leader.api.base_url
        idle = Fleet(work, url, enrolled, args.workers, args.procs)
        result = await idle_links(leader, idle, args.tls, args.deflate)
        if args.cycles:
            cycling = Fleet(work, url, enrolled, CHURN_CLIENTS, args.procs)
            result |= await churn(leader, cycling, args.cycles, args.tls)
    finally:
        await leader.api.close()
        leader.terminate()
    return {"workers": args.workers, "tls": args.tls, "deflate": args.deflate, **result}


def render(r: dict[str, Any]) -> str:
    mode = ("TLS" if r["tls"] else "plain") + (", clients offer deflate" if r["deflate"] else "")
    lines = [
        f"{r['workers']} idle workers, {mode}",
        f"  leader RSS {r['rss_before_kib']} KiB -> {r['rss_connected_kib']} KiB:"
        f" {r['kib_per_link']:.1f} KiB per link",
    ]
    if "cycles" in r:
        lines.append(
            f"  {r['cycles']} connect/disconnect cycles: RSS start {r['rss_start_kib']} KiB,"
            f" middle {r['rss_middle_kib']} KiB, end {r['rss_end_kib']} KiB,"
            f" after the leader's next heap trim {r['rss_trimmed_kib']} KiB"
        )
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, workers=1000)
    parser.add_argument("--deflate", action="store_true")
    parser.add_argument("--cycles", type=int, default=0)
    bench_main(parser.parse_args(), run, render)


if __name__ == "__main__":
    main()
