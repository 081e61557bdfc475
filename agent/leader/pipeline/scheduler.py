"""Decides which deployments run: one per app in submission order, a global limit.

The scheduler owns every runner task: it starts them, cancels them on request, and
on shutdown waits for them under a deadline before cancelling the rest.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

from agent.errors import RequestError
from agent.leader.pipeline.context import LeaderContext
from agent.leader.pipeline.runner import Runner
from agent.leader.pipeline.sources import remove_quietly
from agent.leader.state.models import Deployment, ErrorInfo, State
from agent.logs import get_logger

log = get_logger(__name__)
RETRY_SECONDS = 5.0  # after the store failed under the scheduler or a runner
INTERRUPT_GRACE_S = 20.0


class Scheduler:
    def __init__(self, ctx: LeaderContext) -> None:
        self._ctx = ctx
        self._wake = asyncio.Event()
        self._running: dict[str, tuple[Runner, asyncio.Task[None]]] = {}
        self._accepting = True
        self._lock = asyncio.Lock()

    def wake(self) -> None:
        self._wake.set()

    @property
    def active(self) -> int:
        return len(self._running)

    async def run(self) -> None:
        """Start what may start, then sleep until something changes; until shutdown."""
        while self._accepting:
            self._wake.clear()
            try:
                await self._start_eligible()
            except sqlite3.Error as exc:  # a full disk, say: try again, do not give up
                log.error("scheduler.store_failed", error=repr(exc), retry_s=RETRY_SECONDS)
                asyncio.get_running_loop().call_later(RETRY_SECONDS, self.wake)
            await self._wake.wait()

    async def _start_eligible(self) -> None:
        async with self._lock:
            seen_apps: set[str] = set()
            for dep in await self._ctx.store.unfinished():
                if dep.app in seen_apps:
                    continue
                seen_apps.add(dep.app)
                if dep.id in self._running:
                    continue
                if (
                    not self._accepting
                    or len(self._running) >= self._ctx.config.max_parallel_builds
                ):
                    return
                self._start(dep)

    def _start(self, dep: Deployment) -> None:
        runner = Runner(self._ctx, dep)
        task = asyncio.create_task(runner.run(), name=f"deployment-{dep.id}")
        self._running[dep.id] = (runner, task)
        task.add_done_callback(lambda done: self._finished(dep.id, done))

    def _finished(self, dep_id: str, task: asyncio.Task[None]) -> None:
        self._running.pop(dep_id, None)
        crashed = None if task.cancelled() else task.exception()
        if crashed is None:
            self.wake()
            return
        # The runner could not even record how the deployment ended (the store failing):
        # it is still unfinished, and starting it again at once would spin.
        log.error("deployment.runner_crashed", deployment=dep_id, error=repr(crashed))
        asyncio.get_running_loop().call_later(RETRY_SECONDS, self.wake)

    async def cancel(self, dep_id: str) -> Deployment:
        """Cancel a deployment: a queued one at once, a running one by stopping its work."""
        async with self._lock:
            entry = self._running.get(dep_id)
            if entry is None:
                return await self._cancel_queued(dep_id)
        runner, task = entry
        runner.cancel_requested = True
        task.cancel("cancelled by request")
        await asyncio.wait([task])
        dep = await self._ctx.store.get(dep_id)
        assert dep is not None
        return dep

    async def _cancel_queued(self, dep_id: str) -> Deployment:
        dep = await self._ctx.store.get(dep_id)
        if dep is None:
            raise RequestError(404, "not_found", f"no deployment {dep_id}")
        if dep.state.final:
            raise RequestError(
                409, "invalid_request", f"deployment {dep_id} is already {dep.state.value}"
            )
        dep.state, dep.finished_at = State.CANCELLED, time.time()
        dep.error = ErrorInfo(code="cancelled", message="the deployment was cancelled")
        await self._ctx.journal.save(dep, "state", state=dep.state.value)
        self._ctx.metrics.deployments.labels(
            state="cancelled", code="cancelled", kind=dep.kind
        ).inc()
        self._ctx.git_credentials.forget(dep_id)
        await asyncio.to_thread(remove_quietly, self._ctx.context_path(dep_id))
        self.wake()
        return dep

    async def shutdown(self, drain_timeout: float) -> None:
        """Start nothing new; let running deployments finish until the deadline, then stop them."""
        self._accepting = False
        self.wake()
        async with self._lock:  # a scheduling pass under way ends first, starting nothing
            tasks = [task for _, task in self._running.values()]
        if not tasks:
            return
        log.info("scheduler.draining", running=len(tasks), deadline_s=drain_timeout)
        _, pending = await asyncio.wait(tasks, timeout=drain_timeout)
        for task in pending:
            task.cancel("leader shutting down")
        if pending:
            log.warning("scheduler.drain_deadline_passed", interrupted=len(pending))
            # An interrupted release undoes itself first, one bounded engine call at a
            # time; past this grace the stop goes on and the next start resumes the rest.
            _, left = await asyncio.wait(pending, timeout=INTERRUPT_GRACE_S)
            if left:
                log.error("scheduler.interrupt_grace_passed", still_running=len(left))
