"""Deployment routes: submit (JSON with a git source, or a tar body), read, follow, cancel."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
from aiohttp import web

from agent.credentials import RegistryCredentials
from agent.errors import RequestError
from agent.leader.api.bodies import converted, from_json
from agent.leader.api.keys import CONTEXT, SCHEDULER
from agent.leader.api.streams import ndjson
from agent.leader.pipeline import prebuilt
from agent.leader.pipeline.archive import check_context
from agent.leader.pipeline.context import LeaderContext
from agent.leader.pipeline.sources import (
    receive_upload,
    remove_quietly,
    validate_git_url,
)
from agent.leader.registry import references
from agent.leader.registry.credentials import registry_required
from agent.leader.state.models import (
    BUILD_ARG_KEY,
    DOCKERFILE_PATTERN,
    LABEL_KEY,
    Deployment,
    DeploymentRequest,
    Mode,
    State,
    new_deployment_id,
)
from agent.leader.state.store import IdempotencyConflict
from agent.urls import redact_url, without_userinfo

routes = web.RouteTableDef()
TAR_TYPES = frozenset(
    {
        "application/x-tar",
        "application/tar",
        "application/gzip",
        "application/x-gzip",
        "application/octet-stream",
    }
)
_QUERY_FIELDS = frozenset(
    {
        "app",
        "dockerfile",
        "target",
        "image",
        "build_arg",
        "label",
        "services",
        "allow_manager_placement",
        "prune",
    }
)
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
MAX_PAIRS = 100
MAX_LIST_LIMIT = 1000


@routes.post("/v1/deployments")
async def submit(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    if request.content_type == "application/json":
        req = _decode_json(await request.read())
        upload, fingerprint = None, _fingerprint(msgspec.json.encode(req))
    elif request.content_type in TAR_TYPES:
        req = _request_from_query(request)
        upload = await _receive(ctx, request, req)
        fingerprint = _fingerprint(msgspec.json.encode(req), await _digest_file(upload))
    else:
        raise RequestError(
            415,
            "invalid_request",
            "send application/json, or a tar archive as the body",
        )
    try:
        dep, created = await create(
            ctx,
            lambda: _new_deployment(ctx, req),
            request.headers.get("Idempotency-Key"),
            fingerprint,
            git_url=req.git.url if req.git else None,
        )
        if upload is not None and created:
            upload.rename(ctx.context_path(dep.id))
    finally:
        if upload is not None:
            await asyncio.to_thread(remove_quietly, upload)
    if created:
        request.app[SCHEDULER].wake()
    replay = {} if created else {"Idempotent-Replayed": "true"}
    return web.json_response(render(dep), status=202, headers=replay)


def _decode_json(body: bytes) -> DeploymentRequest:
    req = from_json(body, DeploymentRequest, "deployment")
    if (req.git is None) == (req.prebuilt is None):
        raise RequestError(
            400,
            "invalid_request",
            "a deployment needs one source" + (", not two" if req.git else ""),
            hint="give git {url, ref}, or prebuilt (an image built elsewhere), or send a tar "
            "archive as the body with the fields as query parameters",
        )
    return _validated(req)


def _request_from_query(request: web.Request) -> DeploymentRequest:
    unknown = set(request.query) - _QUERY_FIELDS
    if unknown:
        raise RequestError(400, "invalid_request", f"unknown query parameter(s): {sorted(unknown)}")
    fields: dict[str, Any] = {
        k: request.query[k] for k in ("app", "dockerfile", "target", "image") if k in request.query
    }
    fields["build_args"] = _pairs(request.query.getall("build_arg", []), "build_arg")
    fields["labels"] = _pairs(request.query.getall("label", []), "label")
    for flag in ("allow_manager_placement", "prune"):
        if flag in request.query:
            fields[flag] = _boolean(request.query[flag], flag)
    if "services" in request.query:
        fields["services"] = _json_param(request.query["services"], "services")
    return _validated(converted(fields, DeploymentRequest, "deployment"))


def _boolean(value: str, name: str) -> bool:
    if value.lower() not in _BOOLEANS:
        raise RequestError(400, "invalid_request", f"{name} must be true or false")
    return _BOOLEANS[value.lower()]


def _json_param(value: str, name: str) -> Any:
    try:
        return msgspec.json.decode(value)
    except msgspec.DecodeError as exc:
        raise RequestError(400, "invalid_request", f"{name} is not valid JSON: {exc}") from None


def _pairs(items: list[str], name: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise RequestError(400, "invalid_request", f"{name} must be KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def _validated(req: DeploymentRequest) -> DeploymentRequest:
    if req.prebuilt is not None:
        _check_prebuilt(req)
    if not DOCKERFILE_PATTERN.match(req.dockerfile):
        raise RequestError(
            400,
            "invalid_request",
            "dockerfile must be a relative path inside the context, without '..'",
        )
    _check_keys(req.build_args, BUILD_ARG_KEY, "build_args")
    _check_keys(req.labels, LABEL_KEY, "labels")
    if req.image is not None:
        references.validate_repository(req.image)
    _check_services(req)
    return req


def _check_prebuilt(req: DeploymentRequest) -> None:
    """A prebuilt image is not built: the fields that shape a build would be ignored."""
    build_only = {
        "dockerfile": req.dockerfile != "Dockerfile",
        "build_args": bool(req.build_args),
        "labels": bool(req.labels),
        "image": req.image is not None,
    }
    given = sorted(name for name, set_ in build_only.items() if set_)
    if given:
        raise RequestError(
            400,
            "invalid_request",
            f"{', '.join(given)}: not used with prebuilt, whose image is built already",
            hint="drop them, or deploy from source to build with them",
        )
    references.parse_reference(req.prebuilt or "")


def _check_services(req: DeploymentRequest) -> None:
    names = [svc.name for svc in req.services]
    if len(set(names)) != len(names):
        raise RequestError(400, "invalid_request", "services: each name may appear once")
    if req.prune and not req.services:
        raise RequestError(
            400,
            "invalid_request",
            "prune needs the list of services to keep",
            hint="list the app's services; those not listed are removed",
        )
    for svc in req.services:
        _check_keys(svc.env, BUILD_ARG_KEY, f"services.{svc.name}.env")
        _check_keys(svc.labels, LABEL_KEY, f"services.{svc.name}.labels")


def _check_keys(pairs: dict[str, str], pattern: Any, name: str) -> None:
    if len(pairs) > MAX_PAIRS:
        raise RequestError(400, "invalid_request", f"{name}: at most {MAX_PAIRS} entries")
    for key, value in pairs.items():
        if not pattern.match(key) or len(value) > 4096 or "\x00" in value:
            raise RequestError(400, "invalid_request", f"{name}: invalid entry {key[:64]!r}")


async def _receive(ctx: LeaderContext, request: web.Request, req: DeploymentRequest) -> Path:
    path = ctx.contexts_dir / f"upload-{new_deployment_id()}.part"
    try:
        await receive_upload(request, path, ctx.config.max_context_bytes)
        await asyncio.to_thread(
            check_context, path, req.dockerfile, ctx.config.max_context_bytes * 4
        )
    except BaseException:
        await asyncio.to_thread(remove_quietly, path)
        raise
    return path


async def _digest_file(path: Path) -> str:
    def digest() -> str:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    return await asyncio.to_thread(digest)


def _fingerprint(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()


async def create(
    ctx: LeaderContext,
    make: Callable[[], Awaitable[Deployment]],
    key: str | None,
    fingerprint: str,
    git_url: str | None = None,
) -> tuple[Deployment, bool]:
    """Store the deployment `make` gives, or return the one an earlier request with the
    same Idempotency-Key made (and whether it is new). `git_url`: the source's URL as
    given, with any credentials, kept in memory for the clone."""
    if key is not None and not 1 <= len(key) <= 255:
        raise RequestError(400, "invalid_request", "Idempotency-Key must be 1 to 255 characters")
    try:
        # A retry gets what its first request made, even once the request would be
        # refused (a worker enrolled since, with no registry, say): checked first.
        earlier = None if key is None else await ctx.store.replayed(key, fingerprint)
        if earlier is not None:
            return earlier, False
        dep = await make()
        return await _stored(ctx, dep, git_url, None if key is None else (key, fingerprint))
    except IdempotencyConflict:
        raise RequestError(
            422, "invalid_request", "this Idempotency-Key was used for a different request"
        ) from None


async def _stored(
    ctx: LeaderContext, dep: Deployment, git_url: str | None, key: tuple[str, str] | None
) -> tuple[Deployment, bool]:
    """Store the new deployment; its git credentials, if any, stay in memory for its
    clone (kept before the record exists, so the scheduler never finds it without)."""
    if dep.git_credentials and git_url is not None:
        ctx.git_credentials.keep(dep.id, git_url)
    try:
        made, created = await ctx.store.create(dep, key)
    except BaseException:
        ctx.git_credentials.forget(dep.id)
        raise
    if not created:  # an earlier request's deployment: this one was never made
        ctx.git_credentials.forget(dep.id)
    return made, created


def _without_git_credentials(req: DeploymentRequest) -> DeploymentRequest:
    """The request as it is stored: its git URL without user name and password."""
    if req.git is None:
        return req
    git = msgspec.structs.replace(req.git, url=without_userinfo(req.git.url))
    return msgspec.structs.replace(req, git=git)


async def _new_deployment(ctx: LeaderContext, req: DeploymentRequest) -> Deployment:
    if req.git is not None:
        validate_git_url(req.git.url, ctx.config.git_allowed_schemes)
    decision = await ctx.registry.decide_mode()
    creds = ctx.registry.current
    dep_id = new_deployment_id()
    if decision.mode is Mode.REGISTRY and creds is None:
        raise registry_required(decision)
    if req.prebuilt is not None:
        image = await prebuilt.resolve(ctx, req.prebuilt, creds, tag=dep_id)
        return _deployment(dep_id, req, decision.mode, image, creds)
    if creds is None:
        if req.image is not None:
            raise RequestError(
                400,
                "invalid_request",
                "image is set, but no registry is configured",
                hint="drop image to keep the image local, or configure a registry first",
            )
        repository = req.app
    else:
        repository = references.repository_for(req.app, req.image, creds)
    image = prebuilt.Image(repository=repository, tag=dep_id)
    return _deployment(dep_id, req, decision.mode, image, creds)


def _deployment(
    dep_id: str,
    req: DeploymentRequest,
    mode: Mode,
    image: prebuilt.Image,
    creds: RegistryCredentials | None,
) -> Deployment:
    now = time.time()
    built = req.prebuilt is None
    return Deployment(
        id=dep_id,
        app=req.app,
        mode=mode,
        request=_without_git_credentials(req),
        source=("git" if req.git else "upload") if built else "prebuilt",
        kind="build" if built else "prebuilt",
        git_credentials=req.git is not None and without_userinfo(req.git.url) != req.git.url,
        created_at=now,
        updated_at=now,
        repository=image.repository,
        tag=image.tag,
        digest=image.digest,
        image_id=image.image_id,
        platform=image.platform,
        credentials_version=creds.version if creds else None,
    )


@routes.get("/v1/deployments")
async def list_deployments(request: web.Request) -> web.Response:
    query = request.query
    state = query.get("state")
    if state is not None and state not in State.__members__.values():
        raise RequestError(400, "invalid_request", f"unknown state {state!r}")
    try:
        limit = int(query.get("limit", "50"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise RequestError(
            400, "invalid_request", f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}"
        )
    deps = await request.app[CONTEXT].store.list_deployments(query.get("app"), state, limit)
    return web.json_response({"deployments": [render(d) for d in deps]})


async def _load(request: web.Request) -> Deployment:
    dep = await request.app[CONTEXT].store.get(request.match_info["id"])
    if dep is None:
        raise RequestError(404, "not_found", f"no deployment {request.match_info['id']}")
    return dep


@routes.get("/v1/deployments/{id}")
async def get_deployment(request: web.Request) -> web.Response:
    return web.json_response(render(await _load(request)))


@routes.get("/v1/deployments/{id}/events")
async def events(request: web.Request) -> web.StreamResponse:
    dep = await _load(request)
    return await ndjson(request, request.app[CONTEXT].journal.follow(dep.id))


@routes.get("/v1/deployments/{id}/webhooks")
async def webhooks(request: web.Request) -> web.Response:
    dep = await _load(request)
    deliveries = await request.app[CONTEXT].store.webhooks_of(dep.id)
    shown = [{**delivery, "url": redact_url(delivery["url"])} for delivery in deliveries]
    return web.json_response({"webhooks": shown})


@routes.post("/v1/deployments/{id}/cancel")
async def cancel(request: web.Request) -> web.Response:
    dep = await _load(request)
    dep = await request.app[SCHEDULER].cancel(dep.id)
    return web.json_response(render(dep))


def _source(dep: Deployment) -> dict[str, Any]:
    if dep.kind == "prebuilt":
        return {"type": "prebuilt", "ref": dep.request.prebuilt}
    if dep.kind == "rollback":
        return {"type": "rollback", "of": dep.rollback_of}
    git = dep.request.git
    if git is None:
        return {"type": "upload"}
    url = redact_url(git.url)
    if dep.git_credentials:  # stored without them: shown masked, as they were given
        parts = urlsplit(url)
        url = urlunsplit(parts._replace(netloc=f"***@{parts.netloc}"))
    return {"type": "git", "url": url, "ref": git.ref}


def render(dep: Deployment) -> dict[str, Any]:
    """The API's view of a deployment: no secret, the source URL without its password."""
    doc: dict[str, Any] = msgspec.to_builtins(dep)
    req = doc.pop("request")
    doc["source"] = _source(dep)
    del doc["git_credentials"]
    doc["dockerfile"] = req["dockerfile"]
    doc["target"] = req.get("target")
    doc["services"] = [svc["name"] for svc in req["services"]]
    doc["image"] = dep.image_ref
    for name, timing in dep.stages.items():
        doc["stages"][name]["seconds"] = timing.seconds
    return doc
