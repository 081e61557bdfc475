"""Agent rollout routes: start one with the release's wheels, read and follow it, and
the files the workers fetch (with their node secret, not the API token)."""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

import msgspec
from aiohttp import web

from agent.errors import RequestError
from agent.leader.api.keys import CONTEXT, ROLLOUTS
from agent.leader.api.nodes import authenticate_node
from agent.leader.api.streams import ndjson
from agent.leader.links.upgrade_files import WHEEL_NAME, unpack
from agent.leader.pipeline.sources import receive_upload, remove_quietly
from agent.leader.state.rollouts import NodeStep, Rollout, new_rollout_id
from agent.logs import get_logger

log = get_logger(__name__)
routes = web.RouteTableDef()
DEFAULT_NODE_TIMEOUT_S = 120.0
NODE_TIMEOUT_RANGE = (10.0, 3600.0)


@routes.post("/v1/upgrades")
async def start(request: web.Request) -> web.Response:
    ctx, rollouts = request.app[CONTEXT], request.app[ROLLOUTS]
    rollouts.check_free()  # before the upload is taken in
    timeout = _node_timeout(request.query.get("node_timeout"))
    steps = await _steps(request, request.query.get("nodes"))
    rollout_id = new_rollout_id()
    rollouts.files_root.mkdir(mode=0o700, exist_ok=True)
    upload = rollouts.files_root / f"{rollout_id}.tar"
    try:
        await receive_upload(request, upload, ctx.config.max_context_bytes)
        release = await asyncio.to_thread(unpack, upload, rollouts.files_of(rollout_id))
    finally:
        await asyncio.to_thread(remove_quietly, upload)
    rollout = Rollout(
        id=rollout_id,
        version=release.version,
        wheel=release.wheel,
        dependencies=release.dependencies,
        node_timeout=timeout,
        steps=steps,
        created_at=time.time(),
    )
    try:
        await rollouts.start(rollout)
    except BaseException:  # refused (another started meanwhile), or the store failed
        await asyncio.to_thread(shutil.rmtree, rollouts.files_of(rollout_id), True)
        raise
    log.info("rollout.accepted", rollout=rollout_id, version=release.version, nodes=len(steps))
    return web.json_response(render(rollout), status=202)


def _node_timeout(given: str | None) -> float:
    low, high = NODE_TIMEOUT_RANGE
    try:
        value = DEFAULT_NODE_TIMEOUT_S if given is None else float(given)
    except ValueError:
        value = -1.0
    if not low <= value <= high:
        raise RequestError(
            400, "invalid_request", f"node_timeout must be seconds from {low:.0f} to {high:.0f}"
        )
    return value


async def _steps(request: web.Request, names: str | None) -> list[NodeStep]:
    """The nodes to upgrade, in order: those named, or every enrolled node by name."""
    enrolled = await request.app[CONTEXT].store.nodes()
    by_name = {node.name: node for node in enrolled}
    wanted = [n.strip() for n in names.split(",") if n.strip()] if names else sorted(by_name)
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise RequestError(
            400, "invalid_request", f"nodes: no enrolled node named {', '.join(unknown)}"
        )
    if not wanted:
        raise RequestError(409, "invalid_request", "there are no enrolled workers to upgrade")
    return [NodeStep(node_id=by_name[n].id, name=n) for n in dict.fromkeys(wanted)]


@routes.get("/v1/upgrades")
async def list_rollouts(request: web.Request) -> web.Response:
    rollouts = await request.app[CONTEXT].store.rollouts()
    return web.json_response({"upgrades": [render(r) for r in rollouts]})


async def _load(request: web.Request) -> Rollout:
    rollout = await request.app[CONTEXT].store.rollout(request.match_info["id"])
    if rollout is None:
        raise RequestError(404, "not_found", f"no upgrade {request.match_info['id']}")
    return rollout


@routes.get("/v1/upgrades/{id}")
async def get_rollout(request: web.Request) -> web.Response:
    return web.json_response(render(await _load(request)))


@routes.get("/v1/upgrades/{id}/events")
async def events(request: web.Request) -> web.StreamResponse:
    rollout = await _load(request)
    ctx = request.app[CONTEXT]

    async def ended(rollout_id: str) -> bool:
        found = await ctx.store.rollout(rollout_id)
        return found is None or found.state.final

    return await ndjson(request, ctx.journal.follow(rollout.id, ended))


@routes.get("/v1/upgrades/{id}/files/{name}")
async def file(request: web.Request) -> web.FileResponse:
    """A wheel of a running rollout, for an enrolled node (its node secret)."""
    ctx, rollouts = request.app[CONTEXT], request.app[ROLLOUTS]
    await authenticate_node(ctx, request.headers.get("Authorization", ""))
    rollout_id, name = request.match_info["id"], request.match_info["name"]
    running = rollouts.running
    if running is None or running.id != rollout_id or not WHEEL_NAME.match(name):
        raise RequestError(404, "not_found", f"no file {name[:80]} in a running upgrade")
    path = rollouts.files_of(rollout_id) / name  # both parts checked: no way out of it
    if not path.is_file():
        raise RequestError(404, "not_found", f"no file {name} in upgrade {rollout_id}")
    return web.FileResponse(path)


def render(rollout: Rollout) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.to_builtins(rollout)
    doc["counts"] = rollout.counts()
    for step, rendered in zip(rollout.steps, doc["steps"], strict=True):
        rendered["seconds"] = step.seconds
    return doc
