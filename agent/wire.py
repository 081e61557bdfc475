"""The worker link's protocol: typed JSON messages, tagged by `type`, versioned by `v`.

Messages are decoded and validated here, at the edge; a message that does not decode
closes the link with CLOSE_BAD_MESSAGE. Both roles import this module, nothing else of
each other.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec

PROTOCOL_VERSION = 1
HEARTBEAT_SECONDS = 8.0  # a silent peer is found within 1.5 times this
AGENT_PATH = "/v1/agent"
SYNC_ORDER = "sync"  # the order id a worker answers pulls it started from a Sync with
CLOSE_BAD_MESSAGE = 4400
CLOSE_REVOKED = 4403
CLOSE_REPLACED = 4409
CLOSE_TOO_SLOW = 4408
CLOSE_SHUTDOWN = 1001

TEXT_LIMIT = 4096
_Text = Annotated[str, msgspec.Meta(max_length=TEXT_LIMIT)]
_Ref = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class _Message(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="type"
):
    v: int = PROTOCOL_VERSION


class WireCredentials(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Registry credentials as they travel to workers (over TLS only)."""

    version: int
    server: str | None = None
    username: str | None = None
    password: str | None = None


# leader → worker


class Credentials(_Message, frozen=True, kw_only=True, tag="credentials"):
    credentials: WireCredentials


class PullOrder(_Message, frozen=True, kw_only=True, tag="pull"):
    order: _Text
    image: _Ref
    credentials: WireCredentials


class Sync(_Message, frozen=True, kw_only=True, tag="sync"):
    """Sent on every connect: the credentials in force and the images to hold."""

    credentials: WireCredentials
    images: list[_Ref]


class Retain(_Message, frozen=True, kw_only=True, tag="retain"):
    """After a release: keep the app's newest `keep` images, remove older unused ones."""

    app: _Text
    keep: int


# worker → leader


class Hello(_Message, frozen=True, kw_only=True, tag="hello"):
    name: _Text
    agent_version: _Text
    engine_version: _Text
    arch: _Text


class CredentialsAck(_Message, frozen=True, kw_only=True, tag="credentials_ack"):
    version: int


class PullProgress(_Message, frozen=True, kw_only=True, tag="pull_progress"):
    order: _Text
    image: _Ref
    layer: _Text
    status: _Text
    current: int | None = None
    total: int | None = None


class PullResult(_Message, frozen=True, kw_only=True, tag="pull_result"):
    order: _Text
    image: _Ref
    ok: bool
    error: _Text | None = None
    seconds: float = 0.0


ToWorker = Credentials | PullOrder | Sync | Retain
ToLeader = Hello | CredentialsAck | PullProgress | PullResult

T = TypeVar("T")
M = TypeVar("M", bound=_Message)
_encoder = msgspec.json.Encoder()
_to_worker: msgspec.json.Decoder[ToWorker] = msgspec.json.Decoder(ToWorker)
_to_leader: msgspec.json.Decoder[ToLeader] = msgspec.json.Decoder(ToLeader)


class BadMessage(Exception):
    """A message that is not valid JSON, of an unknown type, or of another version."""


def encode(message: ToWorker | ToLeader) -> str:
    return _encoder.encode(message).decode()


def clip(text: str) -> str:
    """`text` cut to fit a text field: an engine's error can carry a proxy's whole page."""
    if len(text) <= TEXT_LIMIT:
        return text
    keep = TEXT_LIMIT - 64  # room for the marker
    return f"{text[:keep]}… ({len(text) - keep} characters cut)"


def decode_for_worker(data: str | bytes) -> ToWorker:
    return _checked(_decode(_to_worker, data))


def decode_for_leader(data: str | bytes) -> ToLeader:
    return _checked(_decode(_to_leader, data))


def _decode(decoder: msgspec.json.Decoder[T], data: str | bytes) -> T:
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise BadMessage(str(exc)[:200]) from None


def _checked(message: M) -> M:
    if message.v != PROTOCOL_VERSION:
        raise BadMessage(f"protocol version {message.v} is not {PROTOCOL_VERSION}")
    return message
