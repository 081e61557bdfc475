"""The scheduler when its store fails under it: it logs, waits and tries again, rather
than dying (nothing would start again) or spinning (a runner restarted at once). And its
stop, which waits for interrupted work a bounded time."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from types import SimpleNamespace
from typing import cast

import pytest

from agent.leader.pipeline import scheduler
from agent.leader.pipeline.context import LeaderContext
from agent.leader.pipeline.runner import Runner
from agent.leader.state.models import Deployment


class FullDiskOnce:
    """A store whose first read fails as SQLite does on a full disk."""

    def __init__(self) -> None:
        self.reads = 0

    async def unfinished(self) -> list[Deployment]:
        self.reads += 1
        if self.reads == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return []


async def test_a_failed_store_read_is_retried_and_the_scheduler_keeps_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scheduler, "RETRY_SECONDS", 0.1)
    store = FullDiskOnce()
    ctx = SimpleNamespace(store=store, config=SimpleNamespace(max_parallel_builds=1))
    sched = scheduler.Scheduler(cast(LeaderContext, ctx))
    running = asyncio.create_task(sched.run())

    async with asyncio.timeout(2):
        while store.reads < 2:
            await asyncio.sleep(0.02)

    assert not running.done()
    await sched.shutdown(0)
    await asyncio.wait_for(running, 1)


async def test_a_stop_waits_for_interrupted_work_only_so_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the drain deadline, a deployment whose interruption takes long (a release
    undoing itself against a slow engine) is given the grace and no more: the stop goes
    on within systemd's stop timeout, and the next start resumes the rest."""
    monkeypatch.setattr(scheduler, "INTERRUPT_GRACE_S", 0.3)

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(5)  # undoing
            raise

    sched = scheduler.Scheduler(cast(LeaderContext, SimpleNamespace()))
    task = asyncio.create_task(slow_to_stop())
    sched._running["d-1"] = (cast(Runner, None), task)
    await asyncio.sleep(0)
    started = time.monotonic()

    await sched.shutdown(0.1)

    assert time.monotonic() - started < 1.0
    task.cancel()


class SlowRead:
    """A store whose read of the unfinished deployments waits until let go."""

    def __init__(self, deployments: list[Deployment]) -> None:
        self.deployments = deployments
        self.reading = asyncio.Event()
        self.go = asyncio.Event()

    async def unfinished(self) -> list[Deployment]:
        self.reading.set()
        await self.go.wait()
        return self.deployments


async def test_a_stop_during_a_scheduling_pass_leaves_nothing_running_undrained(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM while the scheduler is reading what to start: the stop waits for that
    pass, which starts nothing, so no deployment runs outside the drain."""
    queued = cast(Deployment, SimpleNamespace(id="d-1", app="web"))
    store = SlowRead([queued])
    ctx = SimpleNamespace(store=store, config=SimpleNamespace(max_parallel_builds=1))
    sched = scheduler.Scheduler(cast(LeaderContext, ctx))
    started: list[str] = []
    monkeypatch.setattr(sched, "_start", lambda dep: started.append(dep.id))
    running = asyncio.create_task(sched.run())
    await asyncio.wait_for(store.reading.wait(), 2)

    stopping = asyncio.create_task(sched.shutdown(0.1))
    await asyncio.sleep(0.05)
    store.go.set()
    await asyncio.wait_for(stopping, 2)
    await asyncio.wait_for(running, 2)

    assert started == []
