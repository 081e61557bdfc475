"""The release stage: create or update the app's Swarm services on the new image, then
watch them until Swarm has converged or rolled back.

Services roll start-first and roll back on failure, so the previous version keeps
serving until the new one is proven; a rollback is a failure, never a success.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.engine import Engine, PushProgress
from agent.errors import AgentError, DeploymentError, EngineApiError, EngineError
from agent.leader.pipeline.context import LeaderContext
from agent.leader.state.models import Deployment, Mode, ServiceSpec
from agent.logs import get_logger
from agent.retention import APP_LABEL, DEPLOYMENT_LABEL

log = get_logger(__name__)
# How often a converging service is asked about (two engine calls per service still
# converging): the stage ends within this long of Swarm's own end of the update, which
# is what a rollback in seconds waits on.
POLL_SECONDS = 0.2
SERVICE_LABEL = "deploy-agent.service"
NS = 1_000_000_000
FAILED_TASKS_LIMIT = 3
POLL_FAILURES_LIMIT = 10  # polls in a row the engine refused
_ROLLED_BACK = "rollback_completed"


async def release(ctx: LeaderContext, dep: Deployment) -> None:
    engine = ctx.engine
    leader_node = await _require_manager(engine)
    constraints = await _placement(ctx, dep, leader_node)
    nodes = await _swarm_nodes(engine)
    if dep.mode is Mode.REGISTRY and not constraints and _active(nodes, leader_node):
        await _hold_on_leader(ctx, dep)
    headers = await _pull_credentials(ctx, dep, constraints, leader_node, nodes)
    existing = await app_services(engine, dep.app)
    changed = _Changed()
    try:
        await _apply(ctx, dep, existing, changed, constraints=constraints, headers=headers)
        await _converge(ctx, dep)
    except ServiceFailed as exc:
        # A service Swarm rolled back is back already; every other one goes back here.
        await _undo(ctx, dep, changed, keep=exc.service if exc.code == "rolled_back" else None)
        raise
    except (DeploymentError, EngineError, asyncio.CancelledError):
        # A deadline, a cancel or an engine that stopped answering: the deployment fails,
        # so the app must not go on rolling out its new version.
        await _undo(ctx, dep, changed, keep=None)
        raise
    if dep.request.prune:
        await _prune(ctx, dep, existing)


@dataclass
class _Changed:
    """The services this release has updated and created so far, in order."""

    updated: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)


async def _apply(
    ctx: LeaderContext,
    dep: Deployment,
    existing: dict[str, dict[str, Any]],
    changed: _Changed,
    *,
    constraints: list[str],
    headers: dict[str, str],
) -> None:
    """Create or update each service on the new image, noting each as it changes."""
    for svc in dep.request.services:
        name = f"{dep.app}_{svc.name}"
        spec = service_spec(dep, svc, name, constraints=constraints)
        if name in existing and _applied_before(existing[name], dep.id, changed):
            await ctx.journal.record(dep.id, "release", service=name, action="applied_already")
            continue
        if name in existing:
            await _update(ctx.engine, existing[name], spec, headers)
            changed.updated.append(name)
        else:
            await _call(ctx.engine, "POST", "services/create", body=spec, headers=headers)
            changed.created.append(name)
        action = "update" if name in existing else "create"
        await ctx.journal.record(dep.id, "release", service=name, action=action)


def _applied_before(service: Mapping[str, Any], dep_id: str, changed: _Changed) -> bool:
    """Did an attempt of this deployment before a restart already apply its spec? Then it
    counts as changed by this one, as updated if it has a previous version to return to,
    else as created. Applying it again would make the new spec its own previous version,
    leaving nothing to roll back to."""
    labels = service["Spec"].get("Labels") or {}
    if labels.get(DEPLOYMENT_LABEL) != dep_id:
        return False
    name = service["Spec"]["Name"]
    (changed.updated if service.get("PreviousSpec") else changed.created).append(name)
    return True


async def _undo(ctx: LeaderContext, dep: Deployment, changed: _Changed, keep: str | None) -> None:
    """Return the updated services (but `keep`) to their previous version and remove the
    created ones. Runs to its end even when the stage is being cancelled: each engine
    call has its own deadline."""
    updated = [name for name in changed.updated if name != keep]
    undo = asyncio.ensure_future(_roll_back_and_remove(ctx, dep, updated, changed.created))
    try:
        await asyncio.shield(undo)
    except asyncio.CancelledError:
        await undo  # cancelled again while undoing: finish the undo first
        raise


async def _roll_back_and_remove(
    ctx: LeaderContext, dep: Deployment, updated: list[str], created: list[str]
) -> None:
    await _roll_back(ctx.engine, updated)
    await _remove_created(ctx, dep, created)


def service_spec(
    dep: Deployment, svc: ServiceSpec, name: str, *, constraints: list[str]
) -> dict[str, Any]:
    """The Engine API service spec for one service of `dep`."""
    labels = {**svc.labels, APP_LABEL: dep.app, DEPLOYMENT_LABEL: dep.id, SERVICE_LABEL: svc.name}
    container: dict[str, Any] = {
        "Image": dep.image_ref,
        "Env": [f"{k}={v}" for k, v in sorted(svc.env.items())],
        "Labels": labels,
    }
    if svc.command is not None:
        container["Args"] = svc.command
    if svc.health is not None:
        container["Healthcheck"] = {
            "Test": svc.health.test,
            "Interval": int(svc.health.interval_s * NS),
            "Timeout": int(svc.health.timeout_s * NS),
            "Retries": svc.health.retries,
            "StartPeriod": int(svc.health.start_period_s * NS),
        }
    update = {
        "Parallelism": svc.update.parallelism,
        "Delay": int(svc.update.delay_s * NS),
        "Monitor": int(svc.update.monitor_s * NS),
        "Order": svc.update.order,
        "FailureAction": "rollback",
        "MaxFailureRatio": 0,
    }
    # Back in the update's own order: with start-first (the default) the version going
    # back starts before the one leaving stops, so a service that was healthy on the new
    # version keeps serving while the deployment's undo returns it.
    rollback = {**update, "FailureAction": "pause"}
    return {
        "Name": name,
        "Labels": labels,
        "TaskTemplate": {
            "ContainerSpec": container,
            "Placement": {"Constraints": constraints},
            "RestartPolicy": {"Condition": "any", "Delay": NS},
        },
        "Mode": {"Replicated": {"Replicas": svc.replicas}},
        "UpdateConfig": update,
        "RollbackConfig": rollback,
    }


async def _manager_node(engine: Engine) -> str | None:
    """The engine's Swarm node id, if it is an active manager."""
    info = await engine.request("GET", "info")
    swarm = info.get("Swarm") or {}
    manager = swarm.get("LocalNodeState") == "active" and bool(swarm.get("ControlAvailable"))
    return str(swarm["NodeID"]) if manager else None


async def ensure_swarm(engine: Engine, listen_addr: str, advertise_addr: str | None) -> None:
    """Make the leader's engine a single-node Swarm manager, unless it is in a Swarm."""
    if await _manager_node(engine) is not None:
        return
    body: dict[str, Any] = {"ListenAddr": listen_addr, "ForceNewCluster": False}
    if advertise_addr:
        body["AdvertiseAddr"] = advertise_addr
    node_id = await engine.request("POST", "swarm/init", body=body)
    log.info("swarm.initialised", node_id=node_id, advertise_addr=advertise_addr)


async def _placement(ctx: LeaderContext, dep: Deployment, leader_node: str) -> list[str]:
    """Where the services may run. A local image is on the leader's engine alone: they
    run on the leader's own node, whatever other nodes the Swarm has (workers enrolled
    since the deployment was accepted, nodes with no agent). An image in the registry
    runs on workers while any is enrolled, unless the deployment allows managers."""
    if dep.mode is Mode.LOCAL:
        return [f"node.id == {leader_node}"]
    if not dep.request.allow_manager_placement and await ctx.store.enrolled_count() > 0:
        return ["node.role == worker"]
    return []


async def _require_manager(engine: Engine) -> str:
    """The leader's Swarm node id; a DeploymentError when its engine is no manager."""
    try:
        node = await _manager_node(engine)
    except EngineError as exc:
        raise DeploymentError(
            "release_failed", f"the engine did not answer: {exc.message}"
        ) from None
    if node is None:
        raise DeploymentError(
            "release_failed",
            "the leader's Docker Engine is not a Swarm manager, so services cannot be released",
            hint="run `docker swarm init` on the leader, or set leader.swarm_init = true",
        )
    return node


# Credentials that are none: sent with an update, they replace what the service's spec
# holds (Swarm keeps the spec's own when an update sends nothing).
NO_CREDENTIALS = {"X-Registry-Auth": base64.urlsafe_b64encode(b"{}").decode()}


async def _swarm_nodes(engine: Engine) -> list[dict[str, Any]] | None:
    """The Swarm's nodes, or None if they cannot be read now (a manager electing its
    leader answers 503): then every node is taken to lack the image."""
    try:
        nodes: list[dict[str, Any]] = await engine.request("GET", "nodes")
    except EngineError as exc:
        log.warning("release.nodes_unread", error=exc.message)
        return None
    return nodes


def _active(nodes: list[dict[str, Any]] | None, node_id: str) -> bool:
    """Whether the node may be given tasks (unknown: it may)."""
    found = [node for node in nodes or () if node.get("ID") == node_id]
    return not found or (found[0].get("Spec") or {}).get("Availability") == "active"


async def _pull_credentials(
    ctx: LeaderContext,
    dep: Deployment,
    constraints: list[str],
    leader_node: str,
    nodes: list[dict[str, Any]] | None,
) -> dict[str, str]:
    """The registry credentials for Swarm to pull with, only when a node that may run
    the services' tasks is not known to hold the image. Swarm keeps what it is given
    in the service's spec (on every manager's disk, in each worker's task store), so
    otherwise empty ones go, replacing any an earlier release left there."""
    creds = ctx.registry.current
    if dep.mode is Mode.LOCAL or creds is None:
        return {}
    if nodes is not None and not may_lack_image(nodes, dep, constraints, leader_node):
        return NO_CREDENTIALS
    await ctx.journal.record(dep.id, "release", action="credentials_to_swarm")
    return ctx.engine.registry_auth_header(creds)


def may_lack_image(
    nodes: list[dict[str, Any]], dep: Deployment, constraints: list[str], leader_node: str
) -> bool:
    """Whether a Swarm node that may run the tasks is not known to hold the image: one
    whose hostname names no worker that reported it present (a worker left pending,
    a node with no agent of ours). The leader's node holds it (_hold_on_leader)."""
    holding = {name for name, result in dep.nodes.items() if result.get("status") == "present"}
    workers_only = "node.role == worker" in constraints
    for node in nodes:
        spec, status = node.get("Spec") or {}, node.get("Status") or {}
        if node.get("ID") == leader_node or spec.get("Availability") != "active":
            continue
        if status.get("State") != "ready" or (workers_only and spec.get("Role") != "worker"):
            continue
        if (node.get("Description") or {}).get("Hostname") not in holding:
            return True
    return False


async def _hold_on_leader(ctx: LeaderContext, dep: Deployment) -> None:
    """Tasks may run on the leader's node: its engine must hold the image (a build
    server built and pushed it elsewhere). Pulled here, with the credentials in force."""
    ref = dep.image_ref
    try:
        if await ctx.engine.image_id(ref) is not None:
            return
        await ctx.engine.pull(ref, ctx.registry.current, _no_progress)
    except AgentError as exc:
        raise DeploymentError(
            "release_failed",
            f"the leader's engine could not pull {ref}, which its node may run: {exc.message}",
            hint="check that the leader reaches the registry with the credentials in force",
        ) from None
    await ctx.journal.record(dep.id, "release", action="pulled_on_leader", image=ref)


async def _no_progress(_: PushProgress) -> None:
    return None


async def app_services(engine: Engine, app: str) -> dict[str, dict[str, Any]]:
    """The app's existing services, by name."""
    filters = json.dumps({"label": [f"{APP_LABEL}={app}"]})
    services = await _call(engine, "GET", "services", params={"filters": filters})
    return {s["Spec"]["Name"]: s for s in services}


async def _update(
    engine: Engine, current: Mapping[str, Any], spec: dict[str, Any], headers: dict[str, str]
) -> None:
    version = str(current["Version"]["Index"])
    await _call(
        engine,
        "POST",
        f"services/{current['ID']}/update",
        params={"version": version},
        body=spec,
        headers=headers,
    )


async def _call(engine: Engine, method: str, path: str, **kwargs: Any) -> Any:
    try:
        return await engine.request(method, path, **kwargs)
    except EngineError as exc:
        raise DeploymentError(
            "release_failed", f"the Swarm API refused {method} {path}: {exc.message}"
        ) from None


class ServiceFailed(DeploymentError):
    """One service did not converge; the others this deployment updated go back too."""

    def __init__(self, service: str, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(code, message, hint)
        self.service = service


@dataclass
class _Progress:
    running_ids: list[str]
    others_running: int  # tasks of earlier versions: during a rollback, what still serves
    desired: int
    update_state: str | None
    message: str | None
    failed: int
    error: str | None

    @property
    def running(self) -> int:
        return len(self.running_ids)


async def _converge(ctx: LeaderContext, dep: Deployment) -> None:
    """Poll each service until it runs the new image everywhere, or Swarm gives up."""
    specs = {f"{dep.app}_{svc.name}": svc for svc in dep.request.services}
    pending = set(specs)
    seen: dict[str, tuple[int, int, str | None]] = {}
    steady = _Steadiness()
    failures = 0
    while pending:
        for name, svc in specs.items():
            if name not in pending:
                continue
            try:
                progress = await _progress(ctx.engine, name, dep.id, svc.replicas)
            except DeploymentError as exc:
                # One refused poll (a manager electing its leader answers 503) is not the
                # release failing; a run of them is.
                failures += 1
                if failures >= POLL_FAILURES_LIMIT:
                    raise
                log.warning("release.poll_failed", service=name, error=str(exc), failures=failures)
                continue
            failures = 0
            key = (progress.running, progress.others_running, progress.update_state)
            if seen.get(name) != key:
                seen[name] = key
                await ctx.journal.record(
                    dep.id,
                    "release",
                    service=name,
                    running=progress.running,
                    others_running=progress.others_running,
                    desired=progress.desired,
                    update_state=progress.update_state,
                )
            _check_failure(name, progress)
            if _converged(progress, steady.proven(progress.running_ids, svc.update.monitor_s)):
                pending.discard(name)
        if pending:
            await asyncio.sleep(POLL_SECONDS)


def _converged(progress: _Progress, proven: int) -> bool:
    """An update Swarm calls completed has passed Swarm's own monitor window. A new
    service has no update for Swarm to monitor, so its tasks must each stay running for
    that window here: a command that exits at once is briefly seen running."""
    if progress.update_state == "completed":
        return progress.running == progress.desired
    return progress.update_state is None and proven >= progress.desired


class _Steadiness:
    """When each task was first seen running, on the leader's monotonic clock."""

    def __init__(self) -> None:
        self._since: dict[str, float] = {}

    def proven(self, running_ids: list[str], window: float) -> int:
        """How many of `running_ids` have been running for at least `window` seconds."""
        now = time.monotonic()
        since = [self._since.setdefault(task_id, now) for task_id in running_ids]
        return sum(1 for first in since if now - first >= window)


def _check_failure(name: str, progress: _Progress) -> None:
    if progress.update_state == "rollback_paused":
        raise ServiceFailed(
            name,
            "release_failed",
            f"Swarm's rollback of {name} paused: {progress.message}",
            hint="the new image failed and so did the return to the previous version; "
            f"`docker service ps {name}` shows which tasks run what",
        )
    if progress.update_state == _ROLLED_BACK:
        raise ServiceFailed(
            name,
            "rolled_back",
            f"Swarm rolled {name} back to its previous version: {progress.message}",
            hint="the new image failed while Swarm watched it; the previous version keeps "
            "running. Check the service's command and health check",
        )
    if progress.update_state == "paused":
        message = f"Swarm paused the update of {name}: {progress.message}"
        raise ServiceFailed(name, "release_failed", message)
    if progress.update_state is None and progress.failed >= FAILED_TASKS_LIMIT:
        raise ServiceFailed(
            name,
            "release_failed",
            f"the tasks of {name} keep failing ({progress.failed} so far): {progress.error}",
            hint="check the service's command; `docker service ps` shows each task",
        )


async def _progress(engine: Engine, name: str, dep_id: str, desired: int) -> _Progress:
    service = await _call(engine, "GET", f"services/{name}")
    status = service.get("UpdateStatus") or {}
    filters = json.dumps({"service": [name]})
    tasks = await _call(engine, "GET", "tasks", params={"filters": filters})
    ours = [t for t in tasks if _made_by(t, dep_id)]
    running_ids = [t["ID"] for t in ours if _running(t)]
    others = sum(1 for t in tasks if _running(t) and not _made_by(t, dep_id))
    failed = [t for t in ours if t["Status"]["State"] in ("failed", "complete", "rejected")]
    error = next((t["Status"].get("Err") or t["Status"].get("Message") for t in failed), None)
    return _Progress(
        running_ids, others, desired, status.get("State"), status.get("Message"), len(failed), error
    )


def _running(task: Mapping[str, Any]) -> bool:
    return bool(task["DesiredState"] == "running" and task["Status"]["State"] == "running")


def _made_by(task: Mapping[str, Any], dep_id: str) -> bool:
    """Is `task` one of this deployment's? Its container carries the deployment's label;
    matching on the image would also count an earlier deployment of the same digest."""
    labels = task["Spec"]["ContainerSpec"].get("Labels") or {}
    return bool(labels.get(DEPLOYMENT_LABEL) == dep_id)


async def _roll_back(engine: Engine, names: list[str]) -> None:
    """Return services this deployment already moved to the previous version."""
    for name in names:
        try:
            service = await engine.request("GET", f"services/{name}")
            await engine.request(
                "POST",
                f"services/{service['ID']}/update",
                params={"version": str(service["Version"]["Index"]), "rollback": "previous"},
                body=service["Spec"],
            )
            log.warning("release.rolled_back_sibling", service=name)
        except EngineError as exc:
            log.error("release.rollback_failed", service=name, error=exc.message)


async def _remove_created(ctx: LeaderContext, dep: Deployment, names: list[str]) -> None:
    """Services this failed deployment created had no previous version to go back to:
    remove them, so the app is left as it was before."""
    for name in names:
        try:
            await ctx.engine.request("DELETE", f"services/{name}")
        except EngineError as exc:
            log.error("release.remove_failed", service=name, error=exc.message)
            continue
        log.warning("release.removed_new_service", service=name)
        await ctx.journal.record(dep.id, "release", service=name, action="removed")


async def _prune(ctx: LeaderContext, dep: Deployment, existing: dict[str, Any]) -> None:
    wanted = {f"{dep.app}_{svc.name}" for svc in dep.request.services}
    for name, service in existing.items():
        if name not in wanted:
            try:
                await ctx.engine.request("DELETE", f"services/{service['ID']}")
            except EngineError as exc:  # the release is live: its outcome stands
                if not (isinstance(exc, EngineApiError) and exc.status == 404):
                    log.warning("release.prune_failed", service=name, error=exc.message)
                    await ctx.journal.record(
                        dep.id, "release", service=name, action="remove_failed", error=exc.message
                    )
                    continue
            await ctx.journal.record(dep.id, "release", service=name, action="removed")
