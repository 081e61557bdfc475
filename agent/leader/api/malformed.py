"""Requests that fail before they reach the API: a request line or header over its limit,
a malformed request line or header. aiohttp answers them itself, in plain text, and logs
each at error level with a traceback that quotes the request; here they are answered as
every refusal is (a JSON error body) and logged as one warning that quotes nothing.

This replaces aiohttp's per-connection handler (its runner builds it through private
methods); the pinned aiohttp range in pyproject.toml is the one it is written against,
and the API tests send such requests.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from agent.leader.api.middleware import error_body
from agent.logs import get_logger

log = get_logger(__name__)


def _explain(exc: HttpProcessingError, handler: RequestHandler) -> str:
    if isinstance(exc, LineTooLong):
        return (
            f"the request line or a header is too long: at most {handler.max_line_size}"
            f" bytes for the request line, {handler.max_field_size} for a header"
        )
    return "the request is not well-formed HTTP"


class ApiRequestHandler(RequestHandler):
    """aiohttp's connection handler, refusing malformed requests in the API's own way."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        # A TLS handshake sent to a plain-HTTP leader, or a scanner's probe, as a
        # connection's first bytes: common on an open port, harmless, and aiohttp keeps
        # it at debug too.
        quiet = isinstance(exc, BadHttpMethod) and self._request_count == 1
        (log.debug if quiet else log.warning)(
            "http.bad_request", peer=request.remote, status=status, reason=type(exc).__name__
        )
        response = error_body(status, "invalid_request", _explain(exc, self))
        response.force_close()
        return response


class ApiServer(web.Server):
    def __call__(self) -> RequestHandler:
        return ApiRequestHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """aiohttp's application runner, its connections handled by ApiRequestHandler."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return ApiServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
