"""Times acknowledgements as the leader handles them: from the leader issuing a pull
order or a credentials broadcast to each worker's answer having been dealt with.

The probe wraps the hub's message dispatch on one Hub instance; the hub's own code runs
unchanged, and the time is taken when it has finished with the answer.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from agent import wire
from agent.leader.links.hub import Hub

Match = Callable[[wire.ToLeader], bool]


class AckProbe:
    def __init__(self, hub: Hub) -> None:
        self.arrivals: dict[str, float] = {}
        self._match: Match = lambda _: False
        self._expected = 0
        self.done = asyncio.Event()
        original = hub._handle  # observed, not changed

        def handle(link: Any, message: wire.ToLeader) -> Any:
            handed_back = original(link, message)
            if self._match(message):
                self.arrivals[link.node.id] = time.perf_counter()
                if len(self.arrivals) >= self._expected:
                    self.done.set()
            return handed_back

        setattr(hub, "_handle", handle)  # noqa: B010

    def expect(self, match: Match, count: int) -> None:
        self.arrivals = {}
        self._match, self._expected = match, count
        self.done.clear()

    async def latencies(self, since: float, *, within: float) -> list[float]:
        async with asyncio.timeout(within):
            await self.done.wait()
        return [at - since for at in self.arrivals.values()]


def summary(samples: list[float]) -> dict[str, float]:
    """p50, p95, p99 and max, in milliseconds."""
    ordered = sorted(samples)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else None

    def pct(p: int) -> float:
        return ordered[0] if cuts is None else cuts[p - 1]

    return {
        "n": float(len(ordered)),
        "p50_ms": pct(50) * 1000,
        "p95_ms": pct(95) * 1000,
        "p99_ms": pct(99) * 1000,
        "max_ms": ordered[-1] * 1000,
    }


class GcPauses:
    """Collector runs in this process while in use, in CPU time (load on the machine
    stretches wall time, not this)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._started = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._observe)
        return self

    def __exit__(self, *_: object) -> None:
        gc.callbacks.remove(self._observe)

    def _observe(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            self.pauses.append((info["generation"], time.thread_time() - self._started))

    def figures(self) -> dict[str, float]:
        full = [s for gen, s in self.pauses if gen == 2]
        return {
            "collections": float(len(self.pauses)),
            "full_collections": float(len(full)),
            "total_ms": sum(s for _, s in self.pauses) * 1000,
            "full_total_ms": sum(full) * 1000,
            "full_max_ms": max(full, default=0.0) * 1000,
        }
