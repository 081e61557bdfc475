"""The leader's Prometheus metrics, in a registry of its own (one per leader).

Counters and histograms are updated where things happen; gauges about nodes and links
are read from the hub and the store when Prometheus scrapes.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
            ["state", "code"],
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
        self.pull_seconds = Histogram(
            "deploy_agent_pull_duration_seconds",
            "Time workers took to pull an ordered image",
            buckets=PULL_BUCKETS,
            registry=r,
        )
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
