"""Deployment values: the request a client submits and the record the leader keeps.

Requests are decoded and validated at the API edge; records are owned by one runner.
"""

from __future__ import annotations

import enum
import re
import time
import uuid
from typing import Annotated, Any, Literal

import msgspec

APP_NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
AppName = Annotated[str, msgspec.Meta(pattern=APP_NAME_PATTERN)]
DOCKERFILE_PATTERN = re.compile(r"^(?!/)(?!.*(?:^|/)\.\.(?:/|$))[^\x00]{1,255}$")
BUILD_ARG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# A Dockerfile stage's name (`FROM … AS name`), as BuildKit accepts it (in any case).
STAGE_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$"
LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")


class State(enum.StrEnum):
    QUEUED = "queued"
    BUILDING = "building"
    PUSHING = "pushing"
    DISTRIBUTING = "distributing"
    RELEASING = "releasing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (State.SUCCEEDED, State.FAILED, State.CANCELLED)


class Mode(enum.StrEnum):
    LOCAL = "local"
    REGISTRY = "registry"


class GitSource(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    ref: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")] = "HEAD"


class _Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of request values: immutable, and an unknown field is an error."""


class HealthCheck(_Spec, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A container health check, as Docker's HEALTHCHECK takes it."""

    test: Annotated[list[str], msgspec.Meta(min_length=1, max_length=64)]
    interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    retries: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    start_period_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 0.0


class UpdateSettings(_Spec, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How Swarm rolls a service to the new image; a failure always rolls back."""

    parallelism: Annotated[int, msgspec.Meta(ge=0, le=100)] = 1
    delay_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 0.0
    monitor_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    order: Literal["start-first", "stop-first"] = "start-first"


ServiceName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")]


class ServiceSpec(_Spec, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One Swarm service of the app, released as `{app}_{name}`."""

    name: ServiceName
    command: Annotated[list[str], msgspec.Meta(max_length=256)] | None = None
    replicas: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 1
    env: dict[str, str] = msgspec.field(default_factory=dict)
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    health: HealthCheck | None = None
    update: UpdateSettings = msgspec.field(default_factory=UpdateSettings)


class DeploymentRequest(_Spec, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What a client asks for. A tar upload sends the same fields as query parameters;
    `prebuilt` names an image built elsewhere instead of a source to build."""

    app: AppName
    git: GitSource | None = None
    prebuilt: Annotated[str, msgspec.Meta(min_length=1, max_length=512)] | None = None
    dockerfile: str = "Dockerfile"
    target: Annotated[str, msgspec.Meta(pattern=STAGE_PATTERN)] | None = None
    build_args: dict[str, str] = msgspec.field(default_factory=dict)
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    image: str | None = None
    services: Annotated[list[ServiceSpec], msgspec.Meta(max_length=50)] = msgspec.field(
        default_factory=list
    )
    allow_manager_placement: bool = False
    prune: bool = False


class RollbackRequest(_Spec, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/apps/{app}/rollback`: the release to go back to (default: the one
    before the current one)."""

    to: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None


# What a deployment does to get its image: build it, take one built elsewhere, or take
# an earlier release's.
Kind = Literal["build", "prebuilt", "rollback"]


class StageTiming(msgspec.Struct, kw_only=True):
    started_at: float
    finished_at: float | None = None

    @property
    def seconds(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.started_at


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    code: str
    message: str
    hint: str | None = None
    log_tail: list[str] | None = None


class Deployment(msgspec.Struct, kw_only=True):
    """The leader's record of one deployment; only its runner changes it once started."""

    id: str
    app: str
    state: State = State.QUEUED
    mode: Mode
    request: DeploymentRequest
    source: Literal["upload", "git", "prebuilt", "rollback"]
    kind: Kind = "build"
    rollback_of: str | None = None  # the release a rollback redeploys
    created_at: float
    updated_at: float
    finished_at: float | None = None
    repository: str
    tag: str
    credentials_version: int | None = None
    builder: str | None = None  # "buildkit" or "classic", once the build started
    platform: str | None = None  # what the image was built for (os/arch), once built
    # The git URL was given with credentials: the leader kept them in memory only, and
    # a clone after a restart cannot have them.
    git_credentials: bool = False
    image_id: str | None = None
    digest: str | None = None
    stages: dict[str, StageTiming] = msgspec.field(default_factory=dict)
    nodes: dict[str, Any] = msgspec.field(default_factory=dict)
    push_retries: int = 0
    attempts: int = 0
    error: ErrorInfo | None = None

    @property
    def image_ref(self) -> str:
        """How everything after the build refers to the image."""
        if self.digest is not None:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag}"

    def webhook_payload(self, seq: int, event: dict[str, Any]) -> dict[str, Any]:
        """What the control plane is told of a state change."""
        return {
            "deployment": self.id,
            "app": self.app,
            "state": event["state"],
            "seq": seq,
            "at": time.time(),
            "kind": self.kind,
            "rollback_of": self.rollback_of,
            "image": self.image_ref,
            "digest": self.digest,
            "error": None if self.error is None else msgspec.to_builtins(self.error),
        }

    def planned(self) -> tuple[State, ...]:
        """The stages this deployment passes through, in order."""
        return plan(self.mode, release=bool(self.request.services), kind=self.kind)

    def stage_done(self, stage: str) -> bool:
        timing = self.stages.get(stage)
        return timing is not None and timing.finished_at is not None


class CatchUp(msgspec.Struct, frozen=True):
    """A node pulled an image from the Sync it was sent on connect."""

    node: str  # its name, as a deployment's nodes are keyed
    image: str
    seconds: float
    at: float

    def apply(self, dep: Deployment) -> bool:
        """Mark the node present in `dep` if it was pending there for this image."""
        entry = dep.nodes.get(self.node)
        if dep.image_ref != self.image or entry is None or entry.get("status") != "pending":
            return False
        dep.nodes[self.node] = {
            "node_id": entry.get("node_id"),
            "status": "present",
            "seconds": round(self.seconds, 3),
            "caught_up_at": round(self.at, 3),
        }
        return True


def caught_up_meanwhile(dep: Deployment, nodes: list[NodeRecord]) -> int:
    """Mark present the nodes `dep` left pending that have since pulled its image (from
    the Sync sent when they came back while it was still running); return how many."""
    marked = 0
    for node in nodes:
        pull = node.info.last_pull
        if pull is None or not pull.ok:
            continue
        marked += CatchUp(node.name, pull.image, pull.seconds or 0.0, pull.at).apply(dep)
    return marked


def new_deployment_id() -> str:
    """A short id that is also a valid image tag."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def plan(mode: Mode, *, release: bool, kind: Kind = "build") -> tuple[State, ...]:
    """The stages a deployment passes through, in order, for its mode and kind: an image
    built elsewhere, or an earlier release's, is neither built nor pushed."""
    built = kind == "build"
    stages = [State.BUILDING] if built else []
    if mode is Mode.REGISTRY:
        stages += [State.PUSHING, State.DISTRIBUTING] if built else [State.DISTRIBUTING]
    if release:
        stages.append(State.RELEASING)
    return tuple(stages)


class LastPull(msgspec.Struct, kw_only=True):
    image: str
    ok: bool
    at: float
    error: str | None = None
    seconds: float | None = None


class NodeInfo(msgspec.Struct, kw_only=True):
    """What a worker last told the leader about itself."""

    last_seen: float | None = None
    agent_version: str | None = None
    engine_version: str | None = None
    arch: str | None = None
    credentials_version: int | None = None
    last_pull: LastPull | None = None
    protocol: int | None = None  # the worker link's protocol version
    upgradable: bool | None = None  # it can install a new agent release itself


class NodeRecord(msgspec.Struct, kw_only=True):
    id: str
    name: str
    enrolled_at: float
    revoked_at: float | None = None
    info: NodeInfo = msgspec.field(default_factory=NodeInfo)
