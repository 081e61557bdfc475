"""Every refusal is a JSON body `{"error": {"code", "message", "hint"?}}`; every route
but the health check needs the bearer token."""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from agent.errors import RequestError
from agent.logs import get_logger

log = get_logger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC_PATHS = frozenset({"/healthz", "/v1/ca.pem", "/v1/join", "/v1/agent"})
# Paths a node reaches with its own secret, checked by their handler: an upgrade's files.
NODE_PATHS = re.compile(r"^/v1/upgrades/[^/]+/files/[^/]+$")
_HTTP_CODES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "invalid_request",
    415: "invalid_request",
}


def error_body(
    status: int,
    code: str,
    message: str,
    hint: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    error: dict[str, str] = {"code": code, "message": message}
    if hint:
        error["hint"] = hint
    return web.json_response({"error": error}, status=status, headers=headers)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as exc:
        return error_body(exc.status, exc.code, exc.message, exc.hint, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "invalid_request")
        # a 405 says which methods the resource has (RFC 9110): aiohttp's Allow header
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_body(exc.status, code, exc.reason, headers=allow)
    except Exception:
        log.exception("api.internal_error", path=request.path, method=request.method)
        return error_body(500, "internal", "the leader failed to handle this request")


def bearer_auth(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS or NODE_PATHS.match(request.path):
            return await handler(request)
        # headers are decoded with surrogateescape: a stray byte must not fail the encode
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            return error_body(
                401,
                "unauthorized",
                "missing or wrong API token",
                hint="send Authorization: Bearer <leader.api_token>",
            )
        return await handler(request)

    return check
