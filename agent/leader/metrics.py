"""The leader's Prometheus metrics, in a registry of its own (one per leader).

Counters and histograms are updated where things happen; gauges about nodes and links
are read from the hub and the store when Prometheus scrapes.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

STAGE_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
PULL_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
LAG_INTERVAL = 1.0


class LeaderMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.deployments = Counter(
            "deploy_agent_deployments",
            "Deployments that reached a final state",
            ["state", "code", "kind"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "deploy_agent_stage_duration_seconds",
            "Time each stage took",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.push_retries = Counter(
            "deploy_agent_push_retries",
            "Push attempts retried after a transient failure",
            registry=r,
        )
        # One histogram for all workers: per node it would be 14 series each, 70,000 at
        # 5,000 workers. Each node's latest pull time is a gauge of its own instead.
        self.pull_seconds = LoopHistogram(
            "deploy_agent_pull_duration_seconds",
            "Time workers took to pull an ordered image",
            PULL_BUCKETS,
        )
        r.register(self.pull_seconds)
        self.last_pull_seconds = Gauge(
            "deploy_agent_node_last_pull_seconds",
            "Time each connected worker's latest successful pull took",
            ["node"],
            registry=r,
        )
        self.pull_failures = Counter(
            "deploy_agent_pull_failures",
            "Pull orders a worker answered with a failure",
            ["node"],
            registry=r,
        )
        self.workers_connected = Gauge(
            "deploy_agent_workers_connected", "Workers with a link to the leader", registry=r
        )
        self.workers_enrolled = Gauge(
            "deploy_agent_workers_enrolled", "Workers enrolled and not revoked", registry=r
        )
        self.credentials_version = Gauge(
            "deploy_agent_node_credentials_version",
            "Registry credentials version each node acknowledged",
            ["node"],
            registry=r,
        )
        self.credentials_current = Gauge(
            "deploy_agent_credentials_version",
            "Registry credentials version in force",
            registry=r,
        )
        self.send_queue = Gauge(
            "deploy_agent_link_send_queue_depth",
            "Messages waiting to be sent to each worker",
            ["node"],
            registry=r,
        )
        self.loop_lag = Gauge(
            "deploy_agent_event_loop_lag_seconds",
            "How late the event loop woke a 1 s timer, last measured",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def watch_loop_lag(self) -> None:
        """Measure how late the loop runs a timer; a blocked loop shows here first."""
        while True:
            started = time.monotonic()
            await asyncio.sleep(LAG_INTERVAL)
            self.loop_lag.set(max(0.0, time.monotonic() - started - LAG_INTERVAL))


# A Collector by inheritance: before 0.24, prometheus_client types register() with an ABC.
class LoopHistogram(Collector):
    """A histogram without labels, observed and collected on the event loop only.

    prometheus_client's Histogram takes a lock for its sum and again for the bucket an
    observation falls in, about 2 microseconds each time: on the fan-out path that is
    paid once per worker's answer. Here an observation is a bisection and two additions;
    a scrape reads the counts as a histogram of the same name and series.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, total = [], 0
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            total += count
            cumulative.append((_le(bound), total))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=cumulative, sum_value=self._sum
        )


def _le(bound: float) -> str:
    """A bucket's bound as prometheus_client writes it: 0.5, 1.0, +Inf."""
    return "+Inf" if bound == float("inf") else repr(float(bound))
