"""Structured logging: structlog events, JSON off a TTY, with secrets redacted.

Library logs (aiohttp, asyncio) pass through the same processors. The redactor runs
last before rendering, so no secret reaches stdout, not even inside a traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog
from structlog.typing import EventDict, Processor

REDACTED = "***"
_SENSITIVE_KEYS = frozenset({"password", "token", "secret", "authorization", "api_token"})


class Redactor:
    """Replaces every registered secret, wherever it appears in an event, by `***`."""

    def __init__(self) -> None:
        self._secrets: list[str] = []  # longest first: a secret inside a longer one
        # replaced first would leave the longer one's rest shown

    def add(self, *secrets: str | None) -> None:
        known = set(self._secrets)
        known.update(s for s in secrets if s and len(s) >= 4)
        self._secrets = sorted(known, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def __call__(self, _: Any, __: str, event: EventDict) -> EventDict:
        return {key: self._clean(key, value) for key, value in event.items()}

    def _clean(self, key: str, value: Any) -> Any:
        if key.lower() in _SENSITIVE_KEYS and value:
            return REDACTED
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, MutableMapping):
            return {k: self._clean(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean("", v) for v in value]
        return value


redactor = Redactor()


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _renderer(fmt: str) -> Iterable[Processor]:
    if fmt == "console" or (fmt == "auto" and sys.stdout.isatty()):
        return [structlog.processors.format_exc_info, redactor, structlog.dev.ConsoleRenderer()]
    return [
        structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        ),
        redactor,
        structlog.processors.JSONRenderer(),
    ]


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Route structlog and stdlib logging through one pipeline to stdout."""
    shared = _shared_processors()
    render = list(_renderer(fmt))
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(
        logging.WARNING if level != "debug" else logging.DEBUG
    )
    structlog.configure(
        # Level first: a debug line on a hot path costs a lookup, not the whole chain.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
