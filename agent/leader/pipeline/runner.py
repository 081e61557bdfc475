"""Runs one deployment through the stages of its mode to exactly one final state.

The runner is the only writer of its deployment's record while it runs. A cancel from
the user ends it as `cancelled`; a leader shutdown leaves it unfinished, to be resumed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable

import structlog

from agent.errors import DeploymentError, EngineError, SshError
from agent.leader.pipeline import building, platforms, release, stages, whereabouts
from agent.leader.pipeline.context import LeaderContext
from agent.leader.pipeline.sources import remove_quietly
from agent.leader.state.models import (
    Deployment,
    ErrorInfo,
    Mode,
    StageTiming,
    State,
    caught_up_meanwhile,
)
from agent.logs import get_logger

log = get_logger(__name__)
StageFn = Callable[[LeaderContext, Deployment], Awaitable[None]]
_STAGES: dict[State, StageFn] = {
    State.BUILDING: building.build,
    State.PUSHING: stages.push,
    State.DISTRIBUTING: stages.distribute,
    State.RELEASING: release.release,
}


class Runner:
    def __init__(self, ctx: LeaderContext, dep: Deployment) -> None:
        self.ctx = ctx
        self.dep = dep
        self.cancel_requested = False

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(deployment=self.dep.id, app=self.dep.app)
        try:
            await self._attempt()
        except DeploymentError as exc:
            await self.settle(self._fail(exc))
        except asyncio.CancelledError:
            if not self.cancel_requested:
                await self._interrupted()
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            if self._every_stage_done():  # the work is all done: a cancel cannot undo it
                log.info("deployment.cancel_too_late")
                await self.settle(self._finish(State.SUCCEEDED, None))
            else:
                await self.settle(
                    self._fail(DeploymentError("cancelled", "the deployment was cancelled"))
                )
        except Exception as exc:
            log.exception("deployment.crashed")
            failed = DeploymentError(self._failure_code(), f"internal error: {exc!r}")
            await self.settle(self._fail(failed))
        else:
            await self.settle(self._finish(State.SUCCEEDED, None))
            # Old images go once the deployment is known to have succeeded: nothing of it
            # waits on this housekeeping (a cancel or a stop now only cuts it short).
            await stages.retain(self.ctx, self.dep)

    @staticmethod
    async def settle(final: Awaitable[None]) -> None:
        """Write the final state to its end. A cancel that arrives meanwhile comes too late
        to stop any work, and cutting the write short would leave the record unfinished,
        so that the scheduler would run the deployment again."""
        task = asyncio.ensure_future(final)
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
        task.result()

    def _plan(self) -> tuple[State, ...]:
        return self.dep.planned()

    def _every_stage_done(self) -> bool:
        """Whether every stage has finished: a cancel that arrives then can undo nothing,
        so the deployment has succeeded. One with no stage (a local rollback without
        services) has done nothing yet when its check of the image is cut short."""
        stages = self._plan()
        return bool(stages) and all(self.dep.stage_done(stage) for stage in stages)

    async def _attempt(self) -> None:
        self.dep.attempts += 1
        if self.dep.attempts > self.ctx.config.max_attempts:
            raise DeploymentError(
                "interrupted",
                f"the leader stopped {self.dep.attempts - 1} times while this deployment ran",
                hint="look for what stops the leader (memory, restarts), then resubmit",
            )
        if self.dep.attempts > 1:
            await self.ctx.journal.save(self.dep, "resumed", attempt=self.dep.attempts)
        await self._forget_lost_image()
        if self.dep.kind != "build" and not any(map(self.dep.stage_done, self._plan())):
            await self._check_image()
        for stage in self._plan():
            if not self.dep.stage_done(stage):
                await self._run_stage(stage)

    async def _check_image(self) -> None:
        """An image not built here (prebuilt, or a release's) is checked before anything
        is sent: that the workers can run it, and a rollback's, that it still exists."""
        if self.dep.mode is Mode.REGISTRY:
            await self.ctx.hub.flush()  # the architectures the workers' links reported
            archs = platforms.node_archs(await self.ctx.store.nodes())
            platforms.check_image(self.dep.platform, archs)
        if self.dep.kind == "rollback":
            await whereabouts.require_image(self.ctx, self.dep)

    async def _forget_lost_image(self) -> None:
        """A build recorded before a crash counts only while the engine still holds it."""
        if not self.dep.stage_done(State.BUILDING) or self.dep.digest is not None:
            return
        try:
            async with self.ctx.builders.engine() as engine:
                held = await engine.image_id(f"{self.dep.repository}:{self.dep.tag}")
        except (EngineError, SshError):
            held = None  # cannot tell: building again is safe
        if held is None:
            del self.dep.stages[State.BUILDING]

    async def _run_stage(self, stage: State) -> None:
        self.dep.state = stage
        self.dep.stages[stage] = StageTiming(started_at=time.time())
        await self._save("state", state=stage.value)
        structlog.contextvars.bind_contextvars(stage=stage.value)
        log.info("stage.started")
        limit = self.ctx.config.stage_timeouts.for_stage(stage.value)
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                await _STAGES[stage](self.ctx, self.dep)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise DeploymentError(
                "timeout",
                f"the {stage.value} stage did not finish within {limit:.0f} s",
                hint=f"raise leader.stage_timeouts.{stage.value} if this work needs longer",
            ) from None
        self.dep.stages[stage].finished_at = time.time()
        self.ctx.metrics.stage_seconds.labels(stage=stage.value).observe(
            self.dep.stages[stage].seconds or 0.0
        )
        await self._save()
        log.info("stage.finished", seconds=round(self.dep.stages[stage].seconds or 0.0, 3))

    def _failure_code(self) -> str:
        codes = {
            State.BUILDING: "build_failed",
            State.PUSHING: "push_failed",
            State.DISTRIBUTING: "distribution_failed",
        }
        return codes.get(self.dep.state, "release_failed")

    async def _fail(self, exc: DeploymentError) -> None:
        tail = exc.log_tail if isinstance(exc, building.BuildFailed) else None
        error = ErrorInfo(code=exc.code, message=exc.message, hint=exc.hint, log_tail=tail)
        state = State.CANCELLED if exc.code == "cancelled" else State.FAILED
        await self._finish(state, error)

    async def _finish(self, state: State, error: ErrorInfo | None) -> None:
        await self._settle_caught_up()
        now = time.time()
        for timing in self.dep.stages.values():
            timing.finished_at = timing.finished_at or now
        self.dep.state, self.dep.error, self.dep.finished_at = state, error, now
        fields: dict[str, object] = {"state": state.value}
        if error is not None:
            fields |= {"error": {"code": error.code, "message": error.message, "hint": error.hint}}
        await self._save("state", **fields)
        self.ctx.metrics.deployments.labels(
            state=state.value, code=error.code if error else "", kind=self.dep.kind
        ).inc()
        described = {"message": error.message, "hint": error.hint} if error else {}
        log.info(
            "deployment.finished",
            state=state.value,
            code=error.code if error else None,
            **described,
        )
        self.ctx.git_credentials.forget(self.dep.id)  # a clone that never came
        await asyncio.to_thread(remove_quietly, self.ctx.context_path(self.dep.id))

    async def _settle_caught_up(self) -> None:
        """A node that came back while this deployment ran pulled its image from its Sync;
        with no finished record to mark then, it is marked here."""
        if not any(entry.get("status") == "pending" for entry in self.dep.nodes.values()):
            return
        try:
            await self.ctx.hub.flush()
            marked = caught_up_meanwhile(self.dep, await self.ctx.store.nodes())
        except sqlite3.Error as exc:  # the record still finishes; the nodes stay pending
            log.error("deployment.catch_up_failed", error=repr(exc))
            return
        if marked:
            log.info("deployment.nodes_caught_up", nodes=marked)

    async def _interrupted(self) -> None:
        """Shutdown: leave the record unfinished so the next start resumes it."""
        log.warning("deployment.interrupted", stage=self.dep.state.value)
        await asyncio.shield(self.ctx.journal.record(self.dep.id, "interrupted"))

    async def _save(self, event_type: str | None = None, **fields: object) -> None:
        self.dep.updated_at = time.time()
        await self.ctx.journal.save(self.dep, event_type, **fields)
