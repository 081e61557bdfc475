"""Worker routes: join tokens, enrolment, the node list, revocation, and the link itself.

`/v1/ca.pem` and `/v1/join` are open (the join token is the credential there);
`/v1/agent` takes a node's own secret; everything else takes the API token.
"""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Annotated, Any

import msgspec
from aiohttp import web

from agent import wire
from agent.errors import RequestError
from agent.leader.api.keys import CONTEXT
from agent.leader.links.link_socket import LinkSocket
from agent.leader.pipeline.context import LeaderContext
from agent.leader.state.models import NodeRecord
from agent.leader.state.store import NameTaken
from agent.logs import get_logger
from agent.tls import JoinTokenError, make_join_token, new_secret, parse_join_token, secret_hash

log = get_logger(__name__)
routes = web.RouteTableDef()
PUBLIC = frozenset({"/v1/ca.pem", "/v1/join", wire.AGENT_PATH})
NODE_AUTH_SCHEME = "Node "


class JoinRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`secret`, when given, becomes the node's secret: a worker that proposes its own and
    keeps it can repeat a join whose answer it lost and get the same node back."""

    token: Annotated[str, msgspec.Meta(max_length=512)]
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
    secret: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{43,128}$")] | None = None


def _tls(ctx: LeaderContext) -> Any:
    if ctx.tls is None:
        raise RequestError(
            409,
            "invalid_request",
            "workers join over TLS, and this leader serves plain HTTP",
            hint="remove leader.plain_http so the leader serves HTTPS with its own CA",
        )
    return ctx.tls


@routes.post("/v1/join-tokens")
async def new_join_token(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    fingerprint = _tls(ctx).fingerprint()
    secret = new_secret()
    await ctx.store.set_join_token(secret_hash(secret))
    log.info("join_token.rotated")
    return web.json_response(
        {"token": make_join_token(fingerprint, secret), "ca_fingerprint": fingerprint}
    )


@routes.get("/v1/ca.pem")
async def ca_certificate(request: web.Request) -> web.Response:
    tls = _tls(request.app[CONTEXT])
    return web.Response(body=tls.ca_file.read_bytes(), content_type="application/x-pem-file")


@routes.post("/v1/join")
async def join(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    fingerprint = _tls(ctx).fingerprint()
    try:
        body = msgspec.json.decode(await request.read(), type=JoinRequest)
        pinned, secret = parse_join_token(body.token)
    except (msgspec.DecodeError, JoinTokenError) as exc:
        raise RequestError(400, "invalid_request", f"invalid join request: {exc}") from None
    expected = await ctx.store.join_token_hash()
    if (
        pinned != fingerprint
        or expected is None
        or not hmac.compare_digest(secret_hash(secret), expected)
    ):
        log.warning("join.refused", name=body.name)
        raise RequestError(
            401,
            "unauthorized",
            "this join token is not valid for this leader",
            hint="get the current token with `deploy-agent join-token` on the leader",
        )
    node = NodeRecord(id="n-" + secrets.token_hex(6), name=body.name, enrolled_at=time.time())
    node_secret = body.secret or new_secret()
    try:
        enrolled = await ctx.store.add_node(node, secret_hash(node_secret))
    except NameTaken:
        raise RequestError(
            409,
            "invalid_request",
            f"a node named {body.name} is already enrolled",
            hint="revoke it first (DELETE /v1/nodes/{id}), or give this node another name",
        ) from None
    log.info("node.enrolled", node=enrolled.name, node_id=enrolled.id, again=enrolled.id != node.id)
    return web.json_response({"node_id": enrolled.id, "secret": node_secret}, status=201)


@routes.get("/v1/nodes")
async def list_nodes(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    await ctx.hub.flush()
    nodes = await ctx.store.nodes()
    return web.json_response({"nodes": [_render(ctx, node) for node in nodes]})


def _render(ctx: LeaderContext, node: NodeRecord) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.to_builtins(node)
    doc |= doc.pop("info")
    doc["connected"] = ctx.hub.connected(node.id)
    return doc


@routes.delete("/v1/nodes/{id}")
async def revoke_node(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    node_id = request.match_info["id"]
    name = await ctx.store.revoke_node(node_id)
    if name is None:
        raise RequestError(404, "not_found", f"no enrolled node {node_id}")
    ctx.hub.revoke(node_id, name)
    log.info("node.revoked", node_id=node_id, node=name)
    return web.json_response({"id": node_id, "revoked": True})


@routes.get(wire.AGENT_PATH)
async def agent_link(request: web.Request) -> web.WebSocketResponse:
    ctx = request.app[CONTEXT]
    protocol = _protocol(request)
    node = await authenticate_node(ctx, request.headers.get("Authorization", ""))
    # No permessage-deflate: the frames are small, and each deflating link holds ~100 KiB
    # of zlib state on the leader.
    ws = LinkSocket(heartbeat=wire.HEARTBEAT_SECONDS, max_msg_size=1024 * 1024, compress=False)
    await ws.prepare(request)
    await ctx.hub.serve(node, ws, request, protocol)
    return ws


def _protocol(request: web.Request) -> int:
    """The protocol the worker announced, if this leader speaks it: a worker newer than
    its leader is refused, with what to do (leaders are upgraded first)."""
    announced = wire.protocol_of(request.headers.get(wire.PROTOCOL_HEADER))
    if announced is None or announced < wire.OLDEST_PROTOCOL:
        raise RequestError(
            400, "invalid_request", f"{wire.PROTOCOL_HEADER} must be a protocol version"
        )
    if announced > wire.PROTOCOL_VERSION:
        log.warning("link.worker_too_new", peer=request.remote, protocol=announced)
        raise RequestError(
            426,
            "leader_too_old",
            f"this worker speaks protocol {announced} and the leader {wire.PROTOCOL_VERSION}",
            hint="upgrade the leader first, then the workers",
            headers={wire.PROTOCOL_HEADER: str(wire.PROTOCOL_VERSION)},
        )
    return announced


async def authenticate_node(ctx: LeaderContext, header: str) -> NodeRecord:
    node_id, _, secret = header.removeprefix(NODE_AUTH_SCHEME).partition(":")
    known = await ctx.store.node_auth(node_id) if header.startswith(NODE_AUTH_SCHEME) else None
    if known is None or not hmac.compare_digest(secret_hash(secret), known[1]):
        raise RequestError(401, "unauthorized", "unknown node or wrong node secret")
    node = known[0]
    if node.revoked_at is not None:
        raise RequestError(
            403,
            "forbidden",
            "this node was revoked",
            hint="enrol it again with a new join token after clearing its state directory",
        )
    return node
