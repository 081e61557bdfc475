"""App routes: the apps and their current release, an app's releases (and where each
image still is), and the rollback to an earlier release."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
from aiohttp import web

from agent.errors import RequestError
from agent.leader.api.deployments import create, render
from agent.leader.api.keys import CONTEXT, SCHEDULER
from agent.leader.pipeline.rollbacks import new_rollback
from agent.leader.pipeline.whereabouts import Whereabouts, locate
from agent.leader.state.models import AppName, Deployment, RollbackRequest
from agent.leader.state.store import AppSummary

routes = web.RouteTableDef()
DEFAULT_RELEASES = 20
MAX_RELEASES = 100
_app_name = msgspec.json.Decoder(AppName)


@routes.get("/v1/apps")
async def list_apps(request: web.Request) -> web.Response:
    apps = await request.app[CONTEXT].store.apps()
    return web.json_response({"apps": [_app_view(summary) for summary in apps]})


@routes.get("/v1/apps/{app}")
async def show_app(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    app = _app(request)
    releases = await ctx.store.releases(app, _limit(request))
    if not releases and not await ctx.store.list_deployments(app, None, 1):
        raise RequestError(404, "not_found", f"no app {app}")
    where = await locate(ctx, releases)
    current = releases[0].id if releases else None
    return web.json_response(
        {
            "app": app,
            "current": current,
            "releases": [release_view(dep, current, where[dep.id]) for dep in releases],
        }
    )


@routes.post("/v1/apps/{app}/rollback")
async def rollback(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    app = _app(request)
    body = await request.read()
    req = _rollback_request(request, body)
    to = req.to
    # of the request as understood, not its bytes: `{}`, no body and `{ }` are one request
    canonical = msgspec.json.encode(req)
    fingerprint = hashlib.sha256(b"rollback\0" + app.encode() + b"\0" + canonical).hexdigest()
    dep, created = await create(
        ctx,
        lambda: new_rollback(ctx, app, to),
        request.headers.get("Idempotency-Key"),
        fingerprint,
    )
    if created:
        request.app[SCHEDULER].wake()
    replay = {} if created else {"Idempotent-Replayed": "true"}
    return web.json_response(render(dep), status=202, headers=replay)


def _rollback_request(request: web.Request, body: bytes) -> RollbackRequest:
    if not body.strip():
        return RollbackRequest()
    if request.content_type != "application/json":
        raise RequestError(415, "invalid_request", "send application/json, or no body")
    try:
        return msgspec.json.decode(body, type=RollbackRequest)
    except msgspec.DecodeError as exc:
        raise RequestError(400, "invalid_request", f"invalid rollback: {exc}") from None


def _app(request: web.Request) -> str:
    name = request.match_info["app"]
    try:
        return _app_name.decode(msgspec.json.encode(name))
    except msgspec.ValidationError:
        raise RequestError(
            400, "invalid_request", f"{name[:80]!r} is not a valid app name"
        ) from None


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", str(DEFAULT_RELEASES))
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_RELEASES):
        raise RequestError(
            400, "invalid_request", f"limit must be a whole number from 1 to {MAX_RELEASES}"
        )
    return int(raw)


def _app_view(summary: AppSummary) -> dict[str, Any]:
    latest, current = summary.latest, summary.current
    return {
        "app": summary.app,
        "state": latest.state.value,
        "latest": {"id": latest.id, "state": latest.state.value, "kind": latest.kind},
        "current": None if current is None else _release_summary(current),
    }


def _release_summary(dep: Deployment) -> dict[str, Any]:
    return {
        "id": dep.id,
        "kind": dep.kind,
        "rollback_of": dep.rollback_of,
        "image": dep.image_ref,
        "digest": dep.digest,
        "created_at": dep.created_at,
        "finished_at": dep.finished_at,
    }


def release_view(dep: Deployment, current: str | None, where: Whereabouts) -> dict[str, Any]:
    """One release as `GET /v1/apps/{app}` shows it."""
    return {
        **_release_summary(dep),
        "current": dep.id == current,
        "services": msgspec.to_builtins(dep.request.services),
        "prune": dep.request.prune,
        "allow_manager_placement": dep.request.allow_manager_placement,
        "retained": where.to_json(),
    }
