"""Cluster-wide routes: the mode and why, the builder in use, and the liveness probe."""

from __future__ import annotations

import contextlib
import socket

from aiohttp import web

from agent import __version__
from agent.errors import EngineError
from agent.leader.api.keys import CONTEXT, SCHEDULER
from agent.leader.pipeline.build_server import choose_builder
from agent.leader.pipeline.context import LeaderContext

routes = web.RouteTableDef()


@routes.get("/v1/cluster")
async def cluster(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    decision = await ctx.registry.decide_mode()
    creds = ctx.registry.current
    return web.json_response(
        {
            "mode": decision.mode.value,
            "reason": decision.reason,
            "leader": {"hostname": socket.gethostname(), "version": __version__},
            "registry": None if creds is None else creds.public(),
            "builder": await _builder(ctx),
            "counts": {
                "enrolled_workers": decision.enrolled_workers,
                "running_deployments": request.app[SCHEDULER].active,
            },
        }
    )


async def _builder(ctx: LeaderContext) -> dict[str, str]:
    """The builder in use: as the last build found it, or (before any build) as the
    leader's own engine says; a build server is asked at its first build."""
    choice = ctx.builders.last_choice
    if choice is None and not ctx.builders.remote:
        with contextlib.suppress(EngineError):
            choice = choose_builder(ctx.config.builder, await ctx.engine.facts())
            ctx.builders.last_choice = choice
    where = ctx.builders.describe()
    if choice is None:
        reason = "not known until the first build asks the build server's engine"
        return {"builder": ctx.config.builder, "reason": reason, "where": where}
    return {"builder": choice.builder, "reason": choice.reason, "where": where}


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    ctx.hub.observe()
    ctx.metrics.workers_enrolled.set(await ctx.store.enrolled_count())
    return web.Response(body=ctx.metrics.render(), content_type="text/plain", charset="utf-8")


@routes.get("/healthz")
async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
