"""Cluster-wide routes: the mode and why, and the liveness probe."""

from __future__ import annotations

import socket

from aiohttp import web

from agent import __version__
from agent.leader.api.keys import CONTEXT, SCHEDULER

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
            "counts": {
                "enrolled_workers": decision.enrolled_workers,
                "running_deployments": request.app[SCHEDULER].active,
            },
        }
    )


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    ctx.hub.observe()
    ctx.metrics.workers_enrolled.set(await ctx.store.enrolled_count())
    return web.Response(body=ctx.metrics.render(), content_type="text/plain", charset="utf-8")


@routes.get("/healthz")
async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
