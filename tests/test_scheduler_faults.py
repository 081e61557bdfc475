"""The scheduler when its store fails under it: it logs, waits and tries again, rather
than dying (nothing would start again) or spinning (a runner restarted at once)."""

from __future__ import annotations

import asyncio
import sqlite3
from types import SimpleNamespace
from typing import cast

import pytest

from agent.leader import scheduler
from agent.leader.context import LeaderContext
from agent.leader.models import Deployment


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
