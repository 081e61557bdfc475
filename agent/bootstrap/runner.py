"""Runs the bootstrap's steps in order under their deadlines, reporting each as it ends.

The first failure stops the run and names its step; the SSH connection and the local
scratch directory are released whatever happens.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from agent.bootstrap.plan import Plan
from agent.bootstrap.steps import LeaderApi, Outcome, Session, Step, steps
from agent.errors import BootstrapError
from agent.logs import get_logger

log = get_logger(__name__)


async def bootstrap(plan: Plan, leader: LeaderApi) -> float:
    """Install and enrol the worker `plan` describes; the seconds it took."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="deploy-agent-bootstrap-") as workdir:
        session = Session(plan, leader, Path(workdir))
        try:
            for step in steps(plan):
                await _run_step(step, session)
        finally:
            if session.host is not None:
                await session.host.close()
    seconds = time.monotonic() - started
    log.info("bootstrap.done", host=str(plan.target), node=session.name, seconds=round(seconds, 1))
    return seconds


async def _run_step(step: Step, session: Session) -> None:
    started = time.monotonic()
    log.info("bootstrap.step", step=step.name, status="started")
    try:
        outcome = await _within_deadline(step, session)
    except BootstrapError as exc:
        log.error("bootstrap.step", step=exc.step, status="failed", error=exc.message)
        raise
    log.info(
        "bootstrap.step",
        step=step.name,
        status=outcome.status,
        detail=outcome.detail,
        seconds=round(time.monotonic() - started, 2),
    )


async def _within_deadline(step: Step, session: Session) -> Outcome:
    """The step's outcome; any failure comes out as a BootstrapError naming the step."""
    deadline = asyncio.timeout(step.deadline)
    try:
        async with deadline:
            return await step.run(session)
    except BootstrapError:
        raise
    except TimeoutError as exc:
        if deadline.expired():
            raise BootstrapError(step.name, f"not done within {step.deadline:.0f} s") from None
        raise BootstrapError(step.name, _reason(exc)) from exc
    except Exception as exc:  # reported with its step, then the run stops: never swallowed
        raise BootstrapError(step.name, _reason(exc)) from exc


def _reason(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc)
    if not message and isinstance(exc, TimeoutError):
        return "a call to the leader or the host did not answer within its own deadline"
    return message if message else repr(exc)
