"""What one stuck worker costs the others: pull rounds with and without it, in pairs.

    python -m bench.stuck --workers 1000 [--tls] [--pairs 20]

Besides N healthy simulated workers, one more client stops reading once connected; the
leader sends it orders until its socket buffers are full and its link's sender stalls
with orders queued. Then pull rounds alternate: one ordering the N healthy workers only,
one ordering them and the stuck worker (AB, then BA, and so on). The stuck worker's link
is stalled again before every round that orders it: its send deadline cuts it after
10 s, and the client, frozen for 12 s, then reconnects and stops reading again. The
stuck link stays connected through the rounds that do not order it. Each round's p99
over the healthy workers is taken; the figure is the median of the paired differences
(with it minus without), with a bootstrap 95% interval.
Comparing two separate runs instead mixes in the run-to-run noise of a shared machine,
which at 1,000 workers is larger than the 10 ms being looked for.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
from typing import Any

from agent.leader.links.hub import SEND_DEADLINE, Hub
from agent.leader.server import GC_YOUNG_THRESHOLD
from bench.fanout import IMAGE, pull_round, records
from bench.fleet import (
    bench_main,
    bench_parser,
    connected_fleet,
    wait_for,
)
from bench.probe import AckProbe, summary

# Orders to the stuck worker, ~4 KiB each: ~4.5 MiB, past what the kernel buffers on
# loopback (tcp_wmem up to 4 MiB), so its link's sender stalls with orders queued.
FILL = 1100
PAUSE = 0.3  # between rounds, as in bench.fanout
RESAMPLES = 10_000


async def fill(hub: Hub, stuck: str) -> list[asyncio.Task[Any]]:
    """Send the stuck worker enough orders to fill its socket buffers and stall its link's
    sender, leaving fewer queued than the send queue holds."""
    node = next(node for node in await hub._store.nodes() if node.id == stuck)
    pad = "x" * 4000  # order ids may be 4096 characters long
    tasks = []
    for i in range(FILL):
        order = f"fill-{random.getrandbits(32):08x}-{i}-{pad}"
        tasks.append(asyncio.create_task(hub.pull_everywhere(order, IMAGE, [node])))
        if i % 100 == 99:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    return tasks


class StuckLink:
    """Keeps the stuck worker's link connected and its sender stalled."""

    def __init__(self, hub: Hub, node_id: str) -> None:
        self.hub = hub
        self.node_id = node_id
        self.fills = 0
        self.backlogs: list[int] = []  # orders queued behind the stalled send, per fill
        self._tasks: list[asyncio.Task[Any]] = []

    async def stall(self) -> None:
        await wait_for(lambda: self.hub.connected(self.node_id), 60, "the stuck worker back")
        if self._stalled():
            return
        self._tasks += await fill(self.hub, self.node_id)
        self.fills += 1
        link = self.hub._links.get(self.node_id)
        if not self._stalled() or link is None:
            raise RuntimeError("the stuck worker's link did not stall after a fill")
        self.backlogs.append(link.queue.qsize())

    def _stalled(self) -> bool:
        link = self.hub._links.get(self.node_id)
        return link is not None and link.sending

    async def release(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def p99_ms(samples: list[float]) -> float:
    return summary(samples)["p99_ms"]


def paired_figures(pairs: list[tuple[float, float]]) -> dict[str, float]:
    """Median of (with - without) over the pairs, and its bootstrap 95% interval."""
    diffs = [with_ - without for without, with_ in pairs]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(RESAMPLES))
    return {
        "median_growth_ms": statistics.median(diffs),
        "low_ms": medians[int(0.025 * RESAMPLES)],
        "high_ms": medians[int(0.975 * RESAMPLES) - 1],
        "median_without_ms": statistics.median(p for p, _ in pairs),
        "median_with_ms": statistics.median(p for _, p in pairs),
    }


async def measure(
    hub: Hub, healthy: set[str], stuck: StuckLink, pairs: int
) -> list[tuple[float, float]]:
    probe = AckProbe(hub)
    everyone = await records(hub, healthy | {stuck.node_id})
    others = [node for node in everyone if node.id != stuck.node_id]
    await pull_round(hub, probe, others, len(healthy))  # warm-up, not counted
    results: list[tuple[float, float]] = []
    for i in range(pairs):
        figures: dict[bool, float] = {}
        for with_stuck in (False, True) if i % 2 == 0 else (True, False):
            if with_stuck:
                await stuck.stall()
            nodes = everyone if with_stuck else others
            figures[with_stuck] = p99_ms(await pull_round(hub, probe, nodes, len(healthy)))
            await asyncio.sleep(PAUSE)
        results.append((figures[False], figures[True]))
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with connected_fleet(
        args, args.workers + 1, gc_young=GC_YOUNG_THRESHOLD, stuck=1, stuck_for=SEND_DEADLINE + 2
    ) as (hub, fleet, ids):
        stuck = StuckLink(hub, fleet.stuck_node())
        try:
            pairs = await measure(hub, set(ids) - {stuck.node_id}, stuck, args.pairs)
        finally:
            await stuck.release()
    return {
        "workers": args.workers,
        "tls": args.tls,
        "pairs": [list(pair) for pair in pairs],
        "fills": stuck.fills,
        "backlogs": stuck.backlogs,
        **paired_figures(pairs),
    }


def render(result: dict[str, Any]) -> str:
    link = "TLS" if result["tls"] else "plain"
    backlogs = result["backlogs"]
    return "\n".join(
        [
            f"{result['workers']} workers + 1 stuck, {link}, {len(result['pairs'])} pairs of"
            " pull rounds",
            f"  p99 of the others, median over rounds: {result['median_without_ms']:.1f} ms"
            f" without it, {result['median_with_ms']:.1f} ms with it",
            f"  growth (with - without, paired): median {result['median_growth_ms']:+.1f} ms,"
            f" 95% interval {result['low_ms']:+.1f} to {result['high_ms']:+.1f} ms",
            f"  its link was stalled {result['fills']} times; orders queued behind the"
            f" stalled send: {min(backlogs, default=0)} to {max(backlogs, default=0)}",
        ]
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, workers=1000)
    parser.add_argument("--pairs", type=int, default=20)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    bench_main(parse(argv), run, render)


if __name__ == "__main__":
    main()
