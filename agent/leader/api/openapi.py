"""The OpenAPI 3.1 document of the leader's API, served at /v1/openapi.json.

Request schemas come from the same msgspec types the handlers decode with, so the
document cannot drift from what the API accepts; a test checks it covers every route.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from agent import __version__
from agent.leader.api.apps import DEFAULT_RELEASES, MAX_RELEASES
from agent.leader.api.deployments import MAX_LIST_LIMIT
from agent.leader.api.nodes import JoinRequest
from agent.leader.api.registry import CredentialsBody
from agent.leader.state.models import (
    APP_NAME_PATTERN,
    DeploymentRequest,
    RollbackRequest,
    State,
)
from agent.tls import JOIN_TOKEN_PATTERN

routes = web.RouteTableDef()
_REF = "#/components/schemas/{name}"
_ERRORS = ("400", "401", "404", "409", "413", "415", "422", "503", "507")


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _op(
    summary: str,
    ok: str = "200",
    body: str | None = None,
    success: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    content = success if success is not None else _json({"type": "object"})
    responses: dict[str, Any] = {ok: {"description": "success", **content}}
    responses |= {code: {"description": "refused", **_json(_ref("Error"))} for code in _ERRORS}
    op: dict[str, Any] = {"summary": summary, "responses": responses, **extra}
    if body is not None:
        op["requestBody"] = {"required": True, **_json(_ref(body))}
    return op


_DEP = _json(_ref("Deployment"))
_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_PUBLIC: list[dict[str, list[str]]] = [{}]
_TAR_UPLOAD = {
    "description": "a JSON deployment with a git source, or a tar / tar.gz build context "
    "with the other fields as query parameters",
    "content": {
        # as JSON, a deployment's source is its git repository: `git` is required
        "application/json": {
            "schema": {
                "allOf": [
                    _ref("DeploymentRequest"),
                    {"required": ["git"], "properties": {"git": _ref("GitSource")}},
                ]
            }
        },
        "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
        "application/gzip": {"schema": {"type": "string", "format": "binary"}},
    },
}
_TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}
_PEM = {"content": {"application/x-pem-file": {"schema": {"type": "string"}}}}
_NDJSON = {"content": {"application/x-ndjson": {"schema": {"type": "string"}}}}
_NO_BODY: dict[str, Any] = {}
_UPLOAD_QUERY = [
    {"name": name, "in": "query", "required": False, "schema": schema, "description": what}
    for name, schema, what in (
        ("app", {"type": "string"}, "the app (required with a tar body)"),
        ("dockerfile", {"type": "string"}, "path of the Dockerfile inside the context"),
        ("target", {"type": "string"}, "the Dockerfile stage to build (default: the last)"),
        ("image", {"type": "string"}, "repository to push to"),
        ("build_arg", {"type": "array", "items": {"type": "string"}}, "KEY=VALUE, repeated"),
        ("label", {"type": "array", "items": {"type": "string"}}, "KEY=VALUE, repeated"),
        ("services", {"type": "string"}, "the services as a JSON list"),
        ("allow_manager_placement", {"type": "boolean"}, "place services on managers too"),
        ("prune", {"type": "boolean"}, "remove the app's services not listed"),
    )
]
_APP = [
    {
        "name": "app",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": APP_NAME_PATTERN},
    }
]
_IDEMPOTENCY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
}
_REPLAYED = {
    "Idempotent-Replayed": {
        "description": "`true` when the Idempotency-Key matched an earlier request: "
        "the deployment is the one that request made",
        "schema": {"type": "string"},
    }
}
_LIST_QUERY = [
    {"name": name, "in": "query", "required": False, "schema": schema}
    for name, schema in (
        ("app", {"type": "string"}),
        ("state", {"enum": [state.value for state in State]}),
        ("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": 50}),
    )
]


_WHEEL = {"content": {"application/octet-stream": {"schema": {"type": "string"}}}}


def _upgrade_start() -> dict[str, Any]:
    start = _op(
        "Roll a new agent release out to the workers, one node at a time",
        "202",
        parameters=[
            {
                "name": "nodes",
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "comma-separated node names, in order (default: all, by name)",
            },
            {
                "name": "node_timeout",
                "in": "query",
                "required": False,
                "schema": {"type": "number", "minimum": 10, "maximum": 3600},
                "description": "seconds a node has to come back with the release",
            },
        ],
    )
    start["requestBody"] = {
        "required": True,
        "description": "a tar of the agent's wheel and, optionally, its dependencies' wheels",
        "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
    }
    return start


def _paths() -> dict[str, Any]:
    submit = _op(
        "Submit a deployment",
        "202",
        parameters=[_IDEMPOTENCY, *_UPLOAD_QUERY],
        success=_json(_ref("Deployment")),
    )
    submit["requestBody"] = _TAR_UPLOAD
    submit["responses"]["202"]["headers"] = _REPLAYED
    submit["responses"]["503"] = {
        "description": "the registry (or the leader's engine) did not answer while a "
        "prebuilt image was looked up",
        **_json(_ref("Error")),
    }
    return {
        **_deployment_paths(submit),
        **_app_paths(),
        **_other_paths(),
    }


def _deployment_paths(submit: dict[str, Any]) -> dict[str, Any]:
    return {
        "/v1/deployments": {
            "post": submit,
            "get": _op("List deployments, newest first", parameters=_LIST_QUERY),
        },
        "/v1/deployments/{id}": {"get": _op("One deployment", parameters=_ID, success=_DEP)},
        "/v1/deployments/{id}/events": {
            "get": _op(
                "NDJSON event stream: replays, then follows until final",
                parameters=_ID,
                success=_NDJSON,
            )
        },
        "/v1/deployments/{id}/cancel": {
            "post": _op("Cancel a deployment", parameters=_ID, success=_DEP)
        },
        "/v1/deployments/{id}/webhooks": {
            "get": _op("Webhook deliveries of a deployment and their outcome", parameters=_ID)
        },
    }


def _app_paths() -> dict[str, Any]:
    rollback = _op(
        "Roll an app back to an earlier release (default: the one before the current one)",
        "202",
        parameters=[*_APP, _IDEMPOTENCY],
        success=_DEP,
    )
    rollback["requestBody"] = {"required": False, **_json(_ref("RollbackRequest"))}
    rollback["responses"]["202"]["headers"] = _REPLAYED
    limit = {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_RELEASES,
            "default": DEFAULT_RELEASES,
        },
    }
    return {
        "/v1/apps": {
            "get": _op("Apps, each with its current release", success=_json(_ref("Apps")))
        },
        "/v1/apps/{app}": {
            "get": _op(
                "An app's releases, newest first, and where each image is still kept",
                parameters=[*_APP, limit],
                success=_json(_ref("AppReleases")),
            )
        },
        "/v1/apps/{app}/rollback": {"post": rollback},
    }


def _other_paths() -> dict[str, Any]:
    return {
        "/v1/registry": {
            "put": _op("Verify and store registry credentials", body="CredentialsBody"),
            "get": _op("The registry credentials, without the secret"),
            "delete": _op("Remove the registry credentials"),
        },
        "/v1/cluster": {
            "get": _op("The mode and why, the builder in use, leader identity, counts")
        },
        "/v1/join-tokens": {"post": _op("A new worker join token (rotates the old one)")},
        "/v1/nodes": {"get": _op("Enrolled workers")},
        "/v1/nodes/{id}": {"delete": _op("Revoke a worker", parameters=_ID)},
        "/v1/ca.pem": {
            "get": _op("The leader's CA certificate (PEM)", success=_PEM, security=_PUBLIC)
        },
        "/v1/join": {
            "post": _op(
                "Enrol a worker with a join token", "201", body="JoinRequest", security=_PUBLIC
            )
        },
        "/v1/agent": {
            "get": _op(
                "The worker websocket (node secret)", "101", success=_NO_BODY, security=_PUBLIC
            )
        },
        "/v1/upgrades": {
            "post": _upgrade_start(),
            "get": _op("Agent upgrades (rollouts), newest first"),
        },
        "/v1/upgrades/{id}": {"get": _op("One agent upgrade", parameters=_ID)},
        "/v1/upgrades/{id}/events": {
            "get": _op(
                "NDJSON event stream of an upgrade: replays, then follows until it ends",
                parameters=_ID,
                success=_NDJSON,
            )
        },
        "/v1/upgrades/{id}/files/{name}": {
            "get": _op(
                "A wheel of a running upgrade, for a worker (its node secret)",
                parameters=[
                    *_ID,
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                ],
                success=_WHEEL,
                security=_PUBLIC,
            )
        },
        "/v1/openapi.json": {"get": _op("This document")},
        "/metrics": {"get": _op("Prometheus metrics, text format", success=_TEXT)},
        "/healthz": {"get": _op("Liveness", security=_PUBLIC)},
    }


_STATES = ["queued", "building", "pushing", "distributing", "releasing"]
_DEPLOYMENT = {
    "type": "object",
    "required": ["id", "app", "state", "mode", "source", "image", "stages", "nodes"],
    "properties": {
        "id": {"type": "string"},
        "app": {"type": "string"},
        "state": {"enum": [*_STATES, "succeeded", "failed", "cancelled"]},
        "mode": {"enum": ["local", "registry"]},
        "source": {"type": "object", "required": ["type"]},
        "image": {"type": "string"},
        "digest": {"type": ["string", "null"]},
        "kind": {"enum": ["build", "prebuilt", "rollback"]},
        "rollback_of": {"type": ["string", "null"]},
        "stages": {"type": "object"},
        "nodes": {"type": "object"},
        "error": {"type": ["object", "null"], "required": ["code", "message"]},
    },
}


_KNOWN = {"type": ["boolean", "null"], "description": "null: cannot tell now"}
_RELEASE_SUMMARY = {
    "id": {"type": "string"},
    "kind": {"enum": ["build", "prebuilt", "rollback"]},
    "rollback_of": {"type": ["string", "null"]},
    "image": {"type": "string"},
    "digest": {"type": ["string", "null"]},
    "created_at": {"type": "number"},
    "finished_at": {"type": ["number", "null"]},
}
_APPS = {
    "type": "object",
    "required": ["apps"],
    "properties": {
        "apps": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["app", "state", "latest", "current"],
                "properties": {
                    "app": {"type": "string"},
                    "state": {"enum": [*_STATES, "succeeded", "failed", "cancelled"]},
                    "latest": {"type": "object", "required": ["id", "state", "kind"]},
                    "current": {
                        "oneOf": [
                            {"type": "null"},
                            {"type": "object", "properties": _RELEASE_SUMMARY},
                        ]
                    },
                },
            },
        }
    },
}
_APP_RELEASES = {
    "type": "object",
    "required": ["app", "current", "releases"],
    "properties": {
        "app": {"type": "string"},
        "current": {"type": ["string", "null"]},
        "releases": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [*_RELEASE_SUMMARY, "current", "services", "retained"],
                "properties": {
                    **_RELEASE_SUMMARY,
                    "current": {"type": "boolean"},
                    "services": {"type": "array", "items": {"type": "object"}},
                    "prune": {"type": "boolean"},
                    "allow_manager_placement": {"type": "boolean"},
                    "retained": {
                        "type": "object",
                        "required": ["leader", "workers", "registry"],
                        "properties": {
                            "leader": _KNOWN,
                            "registry": _KNOWN,
                            "workers": {"type": "object", "additionalProperties": _KNOWN},
                        },
                    },
                },
            },
        },
    },
}


def document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [DeploymentRequest, RollbackRequest, CredentialsBody, JoinRequest], ref_template=_REF
    )
    components["JoinRequest"]["properties"]["token"]["pattern"] = JOIN_TOKEN_PATTERN
    components["Deployment"] = _DEPLOYMENT
    components["Apps"] = _APPS
    components["AppReleases"] = _APP_RELEASES
    components["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {k: {"type": "string"} for k in ("code", "message", "hint")},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "deploy-agent leader API", "version": __version__},
        "paths": _paths(),
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


@routes.get("/v1/openapi.json")
async def openapi(_: web.Request) -> web.Response:
    return web.json_response(document())
