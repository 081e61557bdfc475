"""Registry credential routes: the secret goes in, never out."""

from __future__ import annotations

from typing import Annotated

import msgspec
from aiohttp import web

from agent.credentials import RegistryCredentials
from agent.errors import EngineError, RequestError
from agent.leader.api.bodies import from_json
from agent.leader.api.keys import CONTEXT

routes = web.RouteTableDef()
_Text = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
_Name = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9]+(?:[._/-][a-z0-9]+)*$", max_length=255)]


class CredentialsBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    server: Annotated[str, msgspec.Meta(pattern=r"^(https?://)?[A-Za-z0-9.-]+(:[0-9]+)?(/.*)?$")]
    username: _Text
    password: _Text
    namespace: _Name | None = None


@routes.put("/v1/registry")
async def put_registry(request: web.Request) -> web.Response:
    body = from_json(await request.read(), CredentialsBody, "credentials")
    creds = RegistryCredentials(
        server=body.server,
        username=body.username,
        password=body.password,
        namespace=body.namespace,
    )
    try:
        stored = await request.app[CONTEXT].registry.set(creds)
    except EngineError as exc:  # the engine verifies them: without it, nothing can
        raise RequestError(
            503,
            "engine_unavailable",
            f"could not verify the credentials: the leader's Docker Engine: {exc.message}",
            hint="check that the Docker Engine runs and that engine.url names it; "
            "the previous credentials stay in force",
        ) from None
    return web.json_response({"registry": stored.public()})


@routes.get("/v1/registry")
async def get_registry(request: web.Request) -> web.Response:
    current = request.app[CONTEXT].registry.current
    return web.json_response({"registry": None if current is None else current.public()})


@routes.delete("/v1/registry")
async def delete_registry(request: web.Request) -> web.Response:
    registry = request.app[CONTEXT].registry
    removed = await registry.delete()
    return web.json_response({"registry": None, "version": registry.version, "removed": removed})
