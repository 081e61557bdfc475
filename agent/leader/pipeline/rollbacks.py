"""A rollback: a new deployment that redeploys an earlier release's image and services.

It is neither built nor pushed: it distributes the release's digest (workers that hold
it answer at once) and releases the release's own list of services, pruning as that
release did. Which release, and whether its image can reach the nodes at all in the
cluster's mode now, is decided when the rollback is accepted.
"""

from __future__ import annotations

import time

import msgspec

from agent.credentials import RegistryCredentials
from agent.errors import RequestError
from agent.leader.pipeline.context import LeaderContext
from agent.leader.registry.credentials import registry_required
from agent.leader.registry.references import image_host, registry_host
from agent.leader.state.models import Deployment, Mode, State, new_deployment_id


async def new_rollback(ctx: LeaderContext, app: str, to: str | None) -> Deployment:
    """The rollback deployment of `app` to release `to` (default: the one before the
    current one); a RequestError when there is no such release or it cannot be reached."""
    target = await target_release(ctx, app, to)
    decision = await ctx.registry.decide_mode()
    creds = ctx.registry.current
    if decision.mode is Mode.REGISTRY:
        if creds is None:
            raise registry_required(decision)
        _require_in_registry(target, creds)
    now = time.time()
    return Deployment(
        id=new_deployment_id(),
        app=app,
        mode=decision.mode,
        request=msgspec.structs.replace(target.request, git=None, prebuilt=None),
        source="rollback",
        kind="rollback",
        rollback_of=target.id,
        created_at=now,
        updated_at=now,
        repository=target.repository,
        tag=target.tag,
        digest=target.digest,
        image_id=target.image_id,
        platform=target.platform,
        credentials_version=creds.version if creds else None,
    )


async def target_release(ctx: LeaderContext, app: str, to: str | None) -> Deployment:
    if to is not None:
        return await _named_release(ctx, app, to)
    releases = await ctx.store.releases(app, 2)
    if len(releases) < 2:
        await _require_app(ctx, app)
        raise RequestError(
            409,
            "invalid_request",
            f"{app} has {'one release' if releases else 'no release'}: "
            "there is none before the current one to roll back to",
            hint="`deploy-agent history APP` lists its releases",
        )
    return releases[1]


async def _named_release(ctx: LeaderContext, app: str, to: str) -> Deployment:
    target = await ctx.store.get(to)
    if target is None or target.app != app:
        raise RequestError(404, "not_found", f"{app} has no deployment {to}")
    if target.state is not State.SUCCEEDED:
        raise RequestError(
            409,
            "invalid_request",
            f"deployment {to} is {target.state.value}, not a release: only a deployment "
            "that succeeded can be rolled back to",
            hint="`deploy-agent history APP` lists its releases",
        )
    return target


async def _require_app(ctx: LeaderContext, app: str) -> None:
    if not await ctx.store.list_deployments(app, None, 1):
        raise RequestError(404, "not_found", f"no app {app}")


def _require_in_registry(target: Deployment, creds: RegistryCredentials) -> None:
    """In registry mode the nodes pull the release's digest from the configured registry."""
    if target.digest is None:
        raise RequestError(
            409,
            "invalid_request",
            f"release {target.id} was deployed in local mode: its image was never pushed to "
            "a registry, so the workers cannot pull it",
            hint="deploy that version again from its source",
        )
    have, wanted = registry_host(creds.server), image_host(target.repository)
    if have != wanted:
        raise RequestError(
            409,
            "invalid_request",
            f"release {target.id}'s image is on {wanted}, but the configured registry is {have}",
            hint=f"deploy that version again from its source, or as a prebuilt image on {have}",
        )
