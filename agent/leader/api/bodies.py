"""Request bodies and parameters decoded into their typed values, or refused with a 400
whose message names the field and says, in the API's words, what it must be."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from agent.errors import RequestError
from agent.validation import explain

T = TypeVar("T")


def from_json(body: bytes, schema: type[T], what: str) -> T:
    """`body` as a `schema`; `what` names it in the error ("deployment", "credentials")."""
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise RequestError(400, "invalid_request", f"invalid {what}: {exc}") from None
    return converted(raw, schema, what)


def converted(raw: Any, schema: type[T], what: str) -> T:
    """`raw` (decoded JSON, or query parameters gathered in a dict) as a `schema`."""
    try:
        return msgspec.convert(raw, schema)
    except msgspec.ValidationError as exc:
        key, message = explain(exc, schema, raw, object_word="an object")
        where = f"{key}: " if key else ""
        raise RequestError(400, "invalid_request", f"invalid {what}: {where}{message}") from None
