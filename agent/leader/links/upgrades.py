"""Agent rollouts: a new release of the agent to the workers, one node at a time.

For each node in turn: skip it if it is offline, already at the release, or cannot
upgrade itself (a previous release's worker, or one installed outside the releases
layout: it needs a manual upgrade); otherwise order the upgrade and wait until the node
is back on its link with the new release and its engine answering. A node that fails,
or is not back within the rollout's node timeout, stops the rollout, which names it.

One rollout runs at a time, owned here from its start to its final state. Its record
is saved at each step, so a leader that restarts resumes it where it was: a node being
upgraded then is asked again (an order twice is harmless) within what is left of its
deadline.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

from agent import wire
from agent.errors import RequestError
from agent.leader.links.hub import Hub
from agent.leader.state.journal import Journal
from agent.leader.state.models import NodeRecord
from agent.leader.state.rollouts import (
    STEP_ENDS,
    NodeStep,
    Rollout,
    RolloutState,
    StepStatus,
)
from agent.leader.state.store import Store
from agent.logs import get_logger

log = get_logger(__name__)
ENGINE_DOWN = "unavailable"  # what a worker's Hello says when its engine did not answer
# How long a step waits for its node to link and say what it runs before judging it
# offline: a leader that just started (a resumed rollout) has no links yet.
READY_GRACE_S = 30.0
# Of a node's timeout, what its restart into the new release is given after the install.
ORDER_MARGIN_S = 15.0
MANUAL = "needs a manual upgrade (deploy-agent bootstrap, or a package install): {why}"


class Rollouts:
    def __init__(self, store: Store, hub: Hub, journal: Journal, files_root: Path) -> None:
        self._store = store
        self._hub = hub
        self._journal = journal
        self.files_root = files_root
        self._task: asyncio.Task[None] | None = None
        # what each node being upgraded says, for the step waiting on it
        self._waiting: dict[str, asyncio.Queue[wire.Hello | wire.UpgradeStatus]] = {}
        self._rollout: Rollout | None = None
        hub.listen(self._heard)

    def files_of(self, rollout_id: str) -> Path:
        return self.files_root / rollout_id

    @property
    def running(self) -> Rollout | None:
        return self._rollout if self._task is not None and not self._task.done() else None

    def check_free(self) -> None:
        """409 while a rollout runs (or is being started): one at a time."""
        busy = self._rollout
        if busy is not None and (self._task is None or not self._task.done()):
            raise RequestError(
                409,
                "invalid_request",
                f"upgrade {busy.id} is still running",
                hint=f"follow it (GET /v1/upgrades/{busy.id}/events) and start this "
                "one once it has ended",
            )

    async def start(self, rollout: Rollout) -> None:
        """Record `rollout` and run it; 409 while another one runs."""
        self.check_free()
        self._rollout, self._task = rollout, None  # taken before the first await
        try:
            await self._store.save_rollout(rollout, _state_event(rollout))
        except BaseException:
            self._rollout = None
            raise
        self._journal.wake(rollout.id)
        self._run(rollout)

    async def resume(self) -> None:
        """At start: carry on with a rollout the last stop left running. Its nodes
        reconnect meanwhile: each step waits for its node a little (READY_GRACE_S)."""
        for rollout in await self._store.rollouts(running=True):
            if self._rollout is None:
                log.info("rollout.resumed", rollout=rollout.id)
                await self._journal.record(rollout.id, "resumed")
                self._run(rollout, resumed=True)

    def _run(self, rollout: Rollout, *, resumed: bool = False) -> None:
        self._rollout = rollout
        self._task = asyncio.create_task(
            self._drive(rollout, resumed), name=f"rollout-{rollout.id}"
        )
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            # a store that failed, say: the record stays running, the next start resumes it
            log.error(
                "rollout.crashed", rollout=self._rollout and self._rollout.id, error=repr(exc)
            )
        self._rollout = None

    async def stop(self) -> None:
        """Leave the rollout where it is (the next start resumes it)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _drive(self, rollout: Rollout, resumed: bool) -> None:
        log.info("rollout.started", rollout=rollout.id, version=rollout.version)
        for step in rollout.steps:
            if step.status not in STEP_ENDS:
                await self._step(rollout, step, resumed)
            if step.status == "failed":  # also one that failed just before a stop
                rollout.state = RolloutState.FAILED
                rollout.error = f"{step.name}: {step.detail}"
                break
        else:
            rollout.state = RolloutState.SUCCEEDED
        rollout.finished_at = time.time()
        await self._store.save_rollout(rollout, _state_event(rollout))
        self._journal.wake(rollout.id)
        await asyncio.to_thread(shutil.rmtree, self.files_of(rollout.id), True)
        log.info(
            "rollout.finished", rollout=rollout.id, state=rollout.state.value, **rollout.counts()
        )

    async def _step(self, rollout: Rollout, step: NodeStep, resumed: bool) -> None:
        node = await self._ready(step)
        skip = _why_skip(node, rollout.version) if step.status == "waiting" else None
        if skip is not None:
            await self._end(rollout, step, "skipped", skip)
            return
        if node is not None and _is_back(node, rollout.version):  # resumed: it made it
            await self._end(rollout, step, "upgraded", f"back on {rollout.version}")
            return
        if step.status == "waiting":
            step.status, step.started_at = "upgrading", time.time()
            step.from_version = node.info.agent_version if node else None
            await self._save_step(rollout, step)
        started = step.started_at or time.time()
        left = started + rollout.node_timeout - time.time()
        if resumed:  # the leader's own time away does not count against the node
            left = max(left, READY_GRACE_S + ORDER_MARGIN_S)
        status, detail = await self._order_and_wait(rollout, step, left)
        await self._end(rollout, step, status, detail)

    async def _ready(self, step: NodeStep) -> NodeRecord | None:
        """The node once it is linked and has said what it runs (its Hello), waiting for
        that up to READY_GRACE_S; None if it stays away (or silent)."""
        heard: asyncio.Queue[wire.Hello | wire.UpgradeStatus] = asyncio.Queue()
        self._waiting[step.node_id] = heard
        try:
            async with asyncio.timeout(READY_GRACE_S):
                while not self._hub.introduced(step.node_id):
                    await heard.get()
        except TimeoutError:
            pass
        finally:
            self._waiting.pop(step.node_id, None)
        return self._hub.node(step.node_id) if self._hub.introduced(step.node_id) else None

    async def _order_and_wait(
        self, rollout: Rollout, step: NodeStep, seconds: float
    ) -> tuple[StepStatus, str]:
        """Order the upgrade, and take what the node says until the outcome: upgraded
        once it is back with the release, else skipped or failed, and why."""
        heard: asyncio.Queue[wire.Hello | wire.UpgradeStatus] = asyncio.Queue()
        self._waiting[step.node_id] = heard
        deadline = time.monotonic() + max(seconds, 0.0)
        try:
            self._order(rollout, step, deadline)
            async with asyncio.timeout(max(seconds, 0.0)):
                while True:
                    outcome = await self._outcome(rollout, step, await heard.get(), deadline)
                    if outcome is not None:
                        return outcome
        except TimeoutError:
            return "failed", (
                f"not back with {rollout.version} within {rollout.node_timeout:.0f} s "
                "(--node-timeout): look at its agent's log; the rollout stopped here"
            )
        finally:
            self._waiting.pop(step.node_id, None)

    async def _outcome(
        self,
        rollout: Rollout,
        step: NodeStep,
        message: wire.Hello | wire.UpgradeStatus,
        deadline: float,
    ) -> tuple[StepStatus, str] | None:
        """What one message from the node means for its step; None: not the end yet."""
        if isinstance(message, wire.Hello):
            node = self._hub.node(step.node_id)
            if node is not None and _is_back(node, rollout.version):
                return "upgraded", f"back on {rollout.version}"
            if message.agent_version != rollout.version:
                # Back without it: offline when ordered, or restarted mid-upgrade (a
                # leader's restart cuts its downloads). Ordered again: harmless twice.
                self._order(rollout, step, deadline)
            return None
        if message.upgrade != rollout.id:
            return None
        if message.state == "unsupported":
            return "skipped", MANUAL.format(why=message.detail or "it cannot upgrade itself")
        if message.state in wire.UPGRADE_FAILURES:
            return "failed", _failure(message)
        await self._journal.record(
            rollout.id, "progress", node=step.name, state=message.state, detail=message.detail
        )
        return None

    def _order(self, rollout: Rollout, step: NodeStep, deadline: float) -> None:
        """Order the node's upgrade, to be installed in time for its restart to fit in
        what is left of its timeout (the worker stops trying past that)."""
        within = max(deadline - time.monotonic() - ORDER_MARGIN_S, ORDER_MARGIN_S)
        order = wire.UpgradeOrder(
            upgrade=rollout.id,
            version=rollout.version,
            wheel=rollout.wheel,
            dependencies=rollout.dependencies,
            within_s=round(within, 1),
        )
        if not self._hub.send_to(step.node_id, order):
            log.info("rollout.node_not_linked", rollout=rollout.id, node=step.name)

    def _heard(self, node: NodeRecord, message: wire.Hello | wire.UpgradeStatus) -> None:
        """What a node said of itself, for the step that waits on it (if any)."""
        waiting = self._waiting.get(node.id)
        if waiting is not None:
            waiting.put_nowait(message)

    async def _end(self, rollout: Rollout, step: NodeStep, status: StepStatus, detail: str) -> None:
        step.status, step.detail, step.finished_at = status, detail, time.time()
        step.started_at = step.started_at or step.finished_at
        log.info("rollout.node", rollout=rollout.id, node=step.name, status=status, detail=detail)
        await self._save_step(rollout, step)

    async def _save_step(self, rollout: Rollout, step: NodeStep) -> None:
        event = {
            "type": "node",
            "node": step.name,
            "status": step.status,
            "from": step.from_version,
            "to": rollout.version,
            "detail": step.detail,
            "seconds": step.seconds,
        }
        await self._store.save_rollout(rollout, event)
        self._journal.wake(rollout.id)


def _why_skip(node: NodeRecord | None, version: str) -> str | None:
    if node is None:
        return "offline when its turn came: upgrade it later with --nodes"
    info = node.info
    if info.agent_version == version:
        return f"already at {version}"
    if (info.protocol or wire.OLDEST_PROTOCOL) < wire.PROTOCOL_VERSION:
        return MANUAL.format(why=f"its release ({info.agent_version}) cannot upgrade itself")
    if not info.upgradable:
        return MANUAL.format(why="it does not run from the releases layout under its guard")
    return None


def _is_back(node: NodeRecord, version: str) -> bool:
    """Back on its link with `version`, and its engine answering."""
    info = node.info
    return info.agent_version == version and info.engine_version not in (None, ENGINE_DOWN)


def _failure(message: wire.UpgradeStatus) -> str:
    detail = message.detail or "no detail"
    if message.state == "rolled_back":
        return f"rolled back by itself: {detail}"
    return f"the upgrade failed: {detail}"


def _state_event(rollout: Rollout) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "state", "state": rollout.state.value}
    if rollout.state.final:
        event |= {"counts": rollout.counts(), "error": rollout.error}
    return event
