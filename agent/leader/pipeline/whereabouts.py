"""Where a release's image still is: the leader's engine, each worker's, the registry.

Answers `GET /v1/apps/{app}` and a rollback's first question (is its image anywhere?).
Each answer is True, False, or None for "cannot tell now" (an engine or registry that
did not answer, a worker offline or of the previous protocol); nothing here raises for
a place that cannot be asked.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from agent.errors import DeploymentError, EngineError
from agent.leader.pipeline.context import LeaderContext
from agent.leader.registry.references import image_host, registry_host
from agent.leader.state.models import Deployment, Mode
from agent.logs import get_logger

log = get_logger(__name__)
INVENTORY_WITHIN_S = 3.0  # how long the workers' answers are waited for
# How long the leader's engine and the registry are given, for all the releases asked
# about at once: what has not answered by then is "cannot tell now" (None).
LOOKUP_WITHIN_S = 5.0
REGISTRY_CHECKS = 8  # registry questions in flight at once
GONE_HINT = (
    "retention keeps the images of the last leader.keep_images releases; deploy that "
    "version again from its source (or as a prebuilt image)"
)


@dataclass(frozen=True, slots=True)
class Whereabouts:
    leader: bool | None
    registry: bool | None
    workers: dict[str, bool | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"leader": self.leader, "workers": self.workers, "registry": self.registry}


async def locate(ctx: LeaderContext, deps: list[Deployment]) -> dict[str, Whereabouts]:
    """Where each deployment's image is, by deployment id: every place asked at once."""
    refs = list(dict.fromkeys(dep.image_ref for dep in deps))
    leader, registry, workers = await asyncio.gather(
        _on_leader(ctx, refs), _in_registry(ctx, deps), _on_workers(ctx, refs)
    )
    return {
        dep.id: Whereabouts(
            leader=leader[dep.image_ref],
            registry=registry[dep.id],
            workers={name: held.get(dep.image_ref) for name, held in workers.items()},
        )
        for dep in deps
    }


async def require_image(ctx: LeaderContext, dep: Deployment) -> None:
    """Fail with image_gone when the image `dep` redeploys is in none of the places
    that can be asked: then nothing could run it. A place that cannot tell now (a
    registry that did not answer) does not fail it: the stages after say what is wrong."""
    if dep.mode is Mode.LOCAL:  # the leader's engine is the one place it can come from
        gone = (await _on_leader(ctx, [dep.image_ref]))[dep.image_ref] is False
        lost = "the leader's engine no longer holds it"
    else:
        gone = await _gone_everywhere(ctx, dep)
        lost = "the registry no longer has it, and neither the leader's engine nor any worker's"
    if gone:
        raise DeploymentError(
            "image_gone",
            f"the image of release {dep.rollback_of or dep.id} ({dep.image_ref}) is gone: {lost}",
            GONE_HINT,
        )


async def _gone_everywhere(ctx: LeaderContext, dep: Deployment) -> bool:
    """Whether the registry says it has no such manifest and no engine that answers holds it."""
    if await _in_registry_one(ctx, dep) is not False:
        return False
    (where,) = (await locate(ctx, [dep])).values()
    return not (where.leader or any(where.workers.values()))


async def _on_leader(ctx: LeaderContext, refs: list[str]) -> dict[str, bool | None]:
    found: dict[str, bool | None] = dict.fromkeys(refs)
    try:
        async with asyncio.timeout(LOOKUP_WITHIN_S):
            for ref in refs:
                found[ref] = await _held_by_leader(ctx, ref)
    except TimeoutError:
        log.warning("whereabouts.leader_slow", unanswered=sum(v is None for v in found.values()))
    return found


async def _held_by_leader(ctx: LeaderContext, ref: str) -> bool | None:
    try:
        return await ctx.engine.image_id(ref) is not None
    except EngineError as exc:
        log.warning("whereabouts.leader_unknown", image=ref, error=exc.message)
        return None


async def _on_workers(ctx: LeaderContext, refs: list[str]) -> dict[str, dict[str, bool]]:
    """By worker name: whether its engine holds each ref; an empty map for a worker that
    cannot tell now."""
    nodes = await ctx.store.nodes()
    answers = await ctx.hub.inventory(refs, INVENTORY_WITHIN_S) if nodes and refs else {}
    return {
        node.name: {ref: ref in answers[node.id] for ref in refs} if node.id in answers else {}
        for node in nodes
    }


async def _in_registry(ctx: LeaderContext, deps: list[Deployment]) -> dict[str, bool | None]:
    slots = asyncio.Semaphore(REGISTRY_CHECKS)
    found: dict[str, bool | None] = dict.fromkeys(dep.id for dep in deps)

    async def check(dep: Deployment) -> None:
        async with slots:
            found[dep.id] = await _in_registry_one(ctx, dep)

    try:
        async with asyncio.timeout(LOOKUP_WITHIN_S):
            await asyncio.gather(*(check(dep) for dep in deps))
    except TimeoutError:
        log.warning("whereabouts.registry_slow", unanswered=sum(v is None for v in found.values()))
    return found


async def _in_registry_one(ctx: LeaderContext, dep: Deployment) -> bool | None:
    """Whether the configured registry serves the image's digest; None for an image
    never pushed, on another registry than the configured one, or no answer."""
    creds = ctx.registry.current
    if (
        dep.digest is None
        or creds is None
        or image_host(dep.repository) != registry_host(creds.server)
    ):
        return None
    try:
        return await ctx.engine.manifest(dep.image_ref, creds) is not None
    except EngineError as exc:
        log.warning("whereabouts.registry_unknown", image=dep.image_ref, error=exc.message)
        return None
