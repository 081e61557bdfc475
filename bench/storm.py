"""Reconnect storm: restart the leader under N connected workers and time their return.

    python -m bench.storm --workers 1000 [--kill]

The leader is a real `deploy-agent run` process serving TLS; it stops (SIGTERM, or
SIGKILL with --kill) and starts again on the same state dir and port. The simulated
workers reconnect with the worker's own backoff (agent/backoff.py, 0.5 s doubling to
30 s, jittered). Reported: time from the stop to the last worker back, and the peak
number of links the new leader accepted in one second (from its log).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time
from pathlib import Path
from typing import Any

from bench.fleet import (
    Fleet,
    bench_main,
    bench_parser,
    ensure_enrolled,
    log_to_file,
    raw_config,
    wait_for,
)
from bench.leaderlog import event_times, links_up
from bench.scratch import scratch_dir
from bench.simworkers import raise_fd_limit
from tests.support.leader import LeaderProcess

BACK_WITHIN_S = 120.0


def _leader(raw: dict[str, Any], work: Path, name: str) -> LeaderProcess:
    (work / name).mkdir()
    return LeaderProcess(raw, work / name)


async def restart(raw: dict[str, Any], work: Path, first: LeaderProcess, kill: bool) -> Any:
    stopped_at = time.time()
    if kill:
        first.kill()
    else:
        await asyncio.to_thread(first.terminate)
    exited_at = time.time()
    second = _leader(raw, work, "after")
    await asyncio.to_thread(second.start)
    return stopped_at, exited_at, time.time(), second


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    with scratch_dir("bench-storm-") as work:
        return await _run(args, work)


async def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    log_to_file(work / "bench.log")
    enrolled = await ensure_enrolled(args.state, args.workers)
    raw = raw_config(args.state, tls=True)
    first = _leader(raw, work, "before")
    first.start()
    fleet = Fleet(work, first.api.base_url, enrolled, args.workers, args.procs).start(tls=True)
    second: LeaderProcess | None = None
    try:
        await wait_for(lambda: links_up(first.log_path) >= args.workers, 300, "all connected")
        stopped_at, exited_at, listening_at, second = await restart(raw, work, first, args.kill)
        log = second.log_path
        await wait_for(lambda: links_up(log) >= args.workers, BACK_WITHIN_S, "all back", 0.5)
    finally:
        fleet.stop()
        for leader in (first, second):
            if leader is not None and leader.proc is not None:
                leader.terminate()
                await leader.api.close()
    times = event_times(log, "link.connected")
    per_second = collections.Counter(int(t) for t in times)
    return {
        "workers": args.workers,
        "kill": args.kill,
        "leader_stop_s": exited_at - stopped_at,
        "leader_down_s": listening_at - stopped_at,
        "all_back_s": max(times) - stopped_at,
        "peak_handshakes_per_s": max(per_second.values()),
    }


def render(r: dict[str, Any]) -> str:
    how = "SIGKILL" if r["kill"] else "SIGTERM"
    return (
        f"{r['workers']} workers, leader restarted ({how}), TLS\n"
        f"  old leader gone after {r['leader_stop_s']:.1f} s,"
        f" new one listening after {r['leader_down_s']:.1f} s;"
        f" all workers back {r['all_back_s']:.1f} s after the stop\n"
        f"  peak {r['peak_handshakes_per_s']} links accepted in one second"
    )


def main() -> None:
    parser = bench_parser(__doc__, workers=1000)
    parser.add_argument("--kill", action="store_true", help="SIGKILL instead of SIGTERM")
    bench_main(parser.parse_args(), run, render)


if __name__ == "__main__":
    main()
