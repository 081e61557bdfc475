"""Agent rollouts: a new release of the agent taken to the workers, one node at a time.

A rollout is owned by the leader's rollout runner once started; its record, like a
deployment's, is what the next start resumes from.
"""

from __future__ import annotations

import enum
import time
import uuid
from typing import Literal

import msgspec

from agent.wire import UpgradeFile

# What became of one node: waiting its turn, being upgraded, or one of the ends.
StepStatus = Literal["waiting", "upgrading", "upgraded", "skipped", "failed"]
STEP_ENDS = frozenset({"upgraded", "skipped", "failed"})


class RolloutState(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self is not RolloutState.RUNNING


class NodeStep(msgspec.Struct, kw_only=True):
    node_id: str
    name: str
    status: StepStatus = "waiting"
    from_version: str | None = None
    detail: str | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return round(self.finished_at - self.started_at, 3)


class Rollout(msgspec.Struct, kw_only=True):
    id: str
    version: str
    wheel: UpgradeFile
    dependencies: list[UpgradeFile]
    node_timeout: float
    steps: list[NodeStep]
    state: RolloutState = RolloutState.RUNNING
    created_at: float
    finished_at: float | None = None
    error: str | None = None

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for step in self.steps:
            found[step.status] = found.get(step.status, 0) + 1
        return found


def new_rollout_id() -> str:
    return "up-" + time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
