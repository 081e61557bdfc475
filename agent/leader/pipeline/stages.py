"""The work of each stage: build, push, distribute. Each raises DeploymentError on failure.

Stages change only the fields of the deployment they produce (image id, digest, retries)
and report progress through the journal.
"""

from __future__ import annotations

import asyncio

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_before_delay,
    wait_exponential_jitter,
)

from agent import wire
from agent.engine import PushProgress
from agent.errors import (
    DeploymentError,
    EngineError,
    RegistryAuthError,
    RegistryError,
    RegistryTransientError,
    SshError,
    SshRefused,
)
from agent.leader.links.hub import Unanswered
from agent.leader.pipeline import platforms
from agent.leader.pipeline.building import BUILD_SERVER_HINT
from agent.leader.pipeline.context import LeaderContext
from agent.leader.state.models import Deployment
from agent.logs import get_logger
from agent.progress import LayerThrottle
from agent.retention import prune_app_images
from agent.retrying import scoped
from agent.wire import PullResult


def _push_retried(exc: BaseException) -> bool:
    """What a push is tried again after: a registry's passing failure, or a build
    server's tunnel that broke (opened again for the next attempt), but not a build
    server that refused the leader, which would refuse it again."""
    return isinstance(exc, (RegistryTransientError, SshError)) and not isinstance(exc, SshRefused)


# Made once: it holds a method of its own, a cycle the collector would otherwise find
# after every push.
PUSH_RETRIED = retry_if_exception(_push_retried)

log = get_logger(__name__)
# The build server's prune delays the deployment's end: bounded, the deployment has
# succeeded (the build server answered its build and push moments before).
BUILD_SERVER_RETAIN_S = 30.0
# Pruning gigabytes of build cache takes a while; it, too, runs after the final state.
BUILD_CACHE_PRUNE_S = 120.0
UNAUTHORIZED_HINT = (
    "check that the registry token has write (push) permission for this repository, "
    "then set it again with PUT /v1/registry"
)


async def push(ctx: LeaderContext, dep: Deployment) -> None:
    if dep.digest is not None:
        return  # resumed after a stop that came once the push was recorded: not redone
    creds = ctx.registry.current
    if creds is None:
        raise DeploymentError(
            "push_failed",
            "the registry credentials were removed before the push",
            hint="set them again with PUT /v1/registry and resubmit",
        )
    progress = _ProgressReporter(ctx, dep)
    try:
        with scoped(
            AsyncRetrying(
                stop=stop_before_delay(ctx.config.push_retry_budget),
                wait=wait_exponential_jitter(initial=1, max=30, jitter=1),
                retry=PUSH_RETRIED,
                before_sleep=_RetryRecorder(ctx, dep),
                reraise=True,
            )
        ) as attempts:
            async for attempt in attempts:
                with attempt:
                    async with ctx.builders.engine() as engine:
                        dep.digest = await engine.push(dep.repository, dep.tag, creds, progress)
    except RegistryAuthError as exc:
        raise DeploymentError(
            "push_unauthorized", f"the registry refused the push: {exc.message}", UNAUTHORIZED_HINT
        ) from None
    except RegistryTransientError as exc:
        raise _exhausted(ctx, dep, exc) from None
    except SshError as exc:
        message = f"the push failed: {exc.message}"
        raise DeploymentError("push_failed", message, BUILD_SERVER_HINT) from None
    except (RegistryError, EngineError) as exc:
        raise DeploymentError("push_failed", f"the push failed: {exc.message}") from None
    # The digest and its event in one transaction: a stop between two writes would
    # leave the event saying pushed and the record not knowing it.
    await ctx.journal.save(dep, "push", status="pushed", digest=dep.digest)


def _exhausted(ctx: LeaderContext, dep: Deployment, exc: RegistryTransientError) -> DeploymentError:
    budget = ctx.config.push_retry_budget
    summary = f"after {dep.push_retries} retries over {budget:.0f} s the push still failed: "
    if exc.unreachable:
        return DeploymentError(
            "registry_unreachable",
            summary + exc.message,
            hint="check that the registry is up and reachable from the leader",
        )
    return DeploymentError("push_failed", summary + exc.message)


class _RetryRecorder:
    """tenacity's before_sleep: count the retry and make it an event."""

    def __init__(self, ctx: LeaderContext, dep: Deployment) -> None:
        self._ctx = ctx
        self._dep = dep

    async def __call__(self, state: RetryCallState) -> None:
        self._dep.push_retries += 1
        self._ctx.metrics.push_retries.inc()
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        fields = {
            "attempt": state.attempt_number,
            "wait_s": round(wait, 2),
            "error": getattr(error, "message", str(error)),
        }
        log.warning("push.retry", deployment=self._dep.id, **fields)
        await self._ctx.journal.save(self._dep, "push.retry", **fields)


class _ProgressReporter:
    """Turns the engine's push progress into events, thinned out per layer."""

    def __init__(self, ctx: LeaderContext, dep: Deployment) -> None:
        self._ctx = ctx
        self._dep = dep
        self._throttle = LayerThrottle()

    async def __call__(self, progress: PushProgress) -> None:
        if not self._throttle.due(progress.layer, progress.status):
            return
        await self._ctx.journal.record(
            self._dep.id,
            "push",
            layer=progress.layer,
            status=progress.status,
            current=progress.current,
            total=progress.total,
        )


async def distribute(ctx: LeaderContext, dep: Deployment) -> None:
    """Have every connected worker pull the digest; offline ones are pending."""
    await ctx.hub.flush()  # the architectures the workers' links reported, written first
    nodes = await ctx.store.nodes()
    # Checked here again, for every image that reaches this stage: no worker pulls an
    # image its architecture cannot run.
    platforms.check_image(dep.platform, platforms.node_archs(nodes))
    await ctx.journal.record(dep.id, "distribution", workers=len(nodes), image=dep.image_ref)
    if not nodes:
        return
    within = answer_window(ctx.config.stage_timeouts.distributing)
    results = await ctx.hub.pull_everywhere(dep.id, dep.image_ref, nodes, within=within)
    dep.nodes = {node.name: _node_result(node.id, results[node.id], within) for node in nodes}
    await ctx.journal.save(dep, "distribution", nodes=dep.nodes)
    failed = {name: r["error"] for name, r in dep.nodes.items() if r["status"] == "failed"}
    if failed:
        raise DeploymentError(
            "distribution_failed",
            "the image could not be pulled on "
            + "; ".join(f"{name}: {error}" for name, error in sorted(failed.items())),
            hint="check each node's engine and that it reaches the registry; nothing was released",
        )


ANSWER_MARGIN_S = 5.0
_PENDING_REASONS = {
    "offline": "offline when the pull was ordered; it pulls the image when it reconnects",
    "disconnected": (
        "its link to the leader dropped before it answered (the agent stopped or the "
        "network failed mid-pull); it pulls the image when it reconnects"
    ),
}


def answer_window(stage_limit: float) -> float:
    """How long the distribution waits for the workers' answers: long enough to leave the
    stage time to record them, so a slow node fails by name and not the stage by its clock."""
    return max(stage_limit - ANSWER_MARGIN_S, stage_limit * 0.9)


def _node_result(node_id: str, result: PullResult | Unanswered, within: float) -> dict[str, object]:
    if result == "late":
        return {
            "node_id": node_id,
            "status": "failed",
            "error": f"no answer within {within:.0f} s (its pull may still be under way)",
        }
    if isinstance(result, str):
        return {"node_id": node_id, "status": "pending", "reason": _PENDING_REASONS[result]}
    if result.ok:
        return {"node_id": node_id, "status": "present", "seconds": round(result.seconds, 3)}
    return {"node_id": node_id, "status": "failed", "error": result.error or "unknown error"}


async def retain(ctx: LeaderContext, dep: Deployment) -> None:
    """Once a deployment has succeeded, the app's images go but those of its last
    `keep_images` releases (what a rollback needs) and of its deployments under way,
    here, on the build server and on every connected worker (unless something still
    uses one). Each engine's outcome is a `retention` event, recorded after the
    deployment's final state. On the engine that builds, removals wait until no build
    runs there (build_gate.py): a build may use any image as a cache candidate."""
    keep = ctx.config.keep_images
    hold = await images_to_keep(ctx, dep.app)
    ctx.hub.broadcast(wire.Retain(app=dep.app, keep=keep, hold=hold))
    try:
        async with ctx.builders.pruning(local=True):
            removed = await prune_app_images(ctx.engine, dep.app, keep, hold)
        await ctx.journal.record(dep.id, "retention", removed=len(removed), kept=keep)
    except EngineError as exc:
        log.warning("retention.failed", app=dep.app, error=exc.message)
        await ctx.journal.record(dep.id, "retention", kept=keep, error=exc.message)
    await _retain_build_cache(ctx, dep)
    if ctx.builders.remote:
        await _retain_on_build_server(ctx, dep, keep, hold)


async def _retain_build_cache(ctx: LeaderContext, dep: Deployment) -> None:
    """The building engine's build cache down to leader.build_cache_max, when no build
    runs there (else at a later deployment's end). Best effort, bounded."""
    if dep.builder != "buildkit":
        return
    limit = ctx.config.build_cache_max
    try:
        async with asyncio.timeout(BUILD_CACHE_PRUNE_S):
            freed = await ctx.builders.prune_build_cache(limit)
    except TimeoutError:
        log.warning("retention.build_cache_failed", error="took too long")
        return
    except (EngineError, SshError) as exc:
        log.warning("retention.build_cache_failed", error=exc.message)
        return
    if freed is None:
        log.info("retention.build_cache_deferred", reason="a build runs")
    elif freed:
        await ctx.journal.record(dep.id, "retention", build_cache_freed=freed, kept_bytes=limit)


async def images_to_keep(ctx: LeaderContext, app: str) -> list[str]:
    """The images of the app's last `keep_images` releases, and of its deployments not
    yet final (one may be building or pulling while this runs)."""
    held = await ctx.store.release_images(app, ctx.config.keep_images)
    under_way = [d.image_ref for d in await ctx.store.unfinished() if d.app == app]
    return list(dict.fromkeys([*held, *under_way]))


async def _retain_on_build_server(
    ctx: LeaderContext, dep: Deployment, keep: int, hold: list[str]
) -> None:
    """Every build leaves its image on the build server: without this, they pile up
    there until its disk is full. Best effort: the deployment has succeeded."""
    try:
        async with (
            ctx.builders.pruning(local=False),
            asyncio.timeout(BUILD_SERVER_RETAIN_S),
            ctx.builders.engine() as engine,
        ):
            removed = await prune_app_images(engine, dep.app, keep, hold)
    except TimeoutError:
        log.warning("retention.build_server_failed", app=dep.app, error="took too long")
        return
    except (EngineError, SshError) as exc:
        log.warning("retention.build_server_failed", app=dep.app, error=exc.message)
        return
    await ctx.journal.record(
        dep.id, "retention", removed=len(removed), kept=keep, where=ctx.builders.describe()
    )
