"""The worker link's protocol: typed JSON messages, tagged by `type`, versioned by `v`.

Messages are decoded and validated here, at the edge. Both roles import this module,
nothing else of each other.

Versions: a worker announces its protocol in the link's handshake (PROTOCOL_HEADER; a
worker without it speaks protocol 1) and the leader speaks to it in that version, as
`encode_for` writes it: the fields and message types added since are left out. Both sides
ignore unknown fields of known messages, and an unknown message type is skipped
(`UnknownMessage`), never a reason to drop the link. A message that is not valid JSON,
or a known type with a wrong field, is a `BadMessage`: the link closes with
CLOSE_BAD_MESSAGE. A worker newer than its leader is refused (CLOSE_LEADER_TOO_OLD).

A field or a message type added to this module names its version in ADDED_IN.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec

PROTOCOL_VERSION = 2  # this release's
OLDEST_PROTOCOL = 1  # the oldest a leader of this release still speaks (the previous release's)
PROTOCOL_HEADER = "X-Deploy-Agent-Protocol"
HEARTBEAT_SECONDS = 8.0  # a silent peer is found within 1.5 times this
AGENT_PATH = "/v1/agent"
SYNC_ORDER = "sync"  # the order id a worker answers pulls it started from a Sync with
CLOSE_BAD_MESSAGE = 4400
CLOSE_REVOKED = 4403
CLOSE_REPLACED = 4409
CLOSE_TOO_SLOW = 4408
CLOSE_SHUTDOWN = 1001
# The worker speaks a newer protocol than the leader: upgrade the leader first. HTTP 426
# on the handshake, for a leader that refuses before the link is up.
CLOSE_LEADER_TOO_OLD = 4426

TEXT_LIMIT = 4096
_Text = Annotated[str, msgspec.Meta(max_length=TEXT_LIMIT)]
_Ref = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class _Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    v: int = PROTOCOL_VERSION


class WireCredentials(msgspec.Struct, frozen=True):
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
    """After a release: remove the app's images that nothing uses, but those `hold`
    names (the images of its last releases, and of its deployments under way). Without
    `hold` (protocol 1), the newest `keep` images stay."""

    app: _Text
    keep: int
    hold: Annotated[list[_Ref], msgspec.Meta(max_length=1000)] | None = None


class Inventory(_Message, frozen=True, kw_only=True, tag="inventory"):
    """Which of these images does the worker's engine hold? Answered with Holding."""

    query: _Text
    images: Annotated[list[_Ref], msgspec.Meta(max_length=1000)]


_Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
_FileName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}\.whl$")]
_Version = Annotated[str, msgspec.Meta(pattern=r"^[0-9][A-Za-z0-9.+!-]{0,63}$")]


class UpgradeFile(msgspec.Struct, frozen=True):
    """A wheel the leader serves for an upgrade, at /v1/upgrades/{upgrade}/files/{name}."""

    name: _FileName
    sha256: _Sha256
    size: int


_UpgradeId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9-]{1,64}$")]


class UpgradeOrder(_Message, frozen=True, kw_only=True, tag="upgrade"):
    """Install `version` beside the running one, restart into it, and come back with it,
    all within `within_s` (past it the leader has given up: the worker stops trying).
    `dependencies` empty: the worker installs the wheel's locked dependencies from its
    package index instead of the leader."""

    upgrade: _UpgradeId
    version: _Version
    wheel: UpgradeFile
    dependencies: list[UpgradeFile]
    within_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0


# worker → leader


class Hello(_Message, frozen=True, kw_only=True, tag="hello"):
    name: _Text
    agent_version: _Text
    engine_version: _Text
    arch: _Text
    # Whether this worker can install another release beside itself and restart into it
    # (it runs from the releases layout, under its guard).
    upgradable: bool = False


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


# What an upgrade's state may be. A string on the wire, not an enumeration: a newer
# worker's new state must not make the message undecodable here.
UPGRADE_STATES = ("downloading", "installing", "restarting", "failed", "unsupported", "rolled_back")
UPGRADE_FAILURES = frozenset({"failed", "unsupported", "rolled_back"})


class UpgradeStatus(_Message, frozen=True, kw_only=True, tag="upgrade_status"):
    """How an upgrade goes on this worker. `rolled_back` comes from the release the
    guard returned to, once it is back: `version` names the one that failed."""

    upgrade: _Text
    version: _Text
    state: _Text  # one of UPGRADE_STATES
    detail: _Text | None = None


class Holding(_Message, frozen=True, kw_only=True, tag="holding"):
    """The answer to an Inventory: the images asked about that the engine holds."""

    query: _Text
    images: Annotated[list[_Ref], msgspec.Meta(max_length=1000)]


ToWorker = Credentials | PullOrder | Sync | Retain | Inventory | UpgradeOrder
ToLeader = Hello | CredentialsAck | PullProgress | PullResult | Holding | UpgradeStatus

# What each protocol version added after the first: {version: {message type: fields}},
# where an empty set of fields means the message type itself is new in that version.
ADDED_IN: dict[int, dict[str, frozenset[str]]] = {
    2: {
        "upgrade": frozenset(),
        "upgrade_status": frozenset(),
        "hello": frozenset({"upgradable"}),
        "retain": frozenset({"hold"}),
        "inventory": frozenset(),
        "holding": frozenset(),
    },
}

T = TypeVar("T")
_encoder = msgspec.json.Encoder()
_to_worker: msgspec.json.Decoder[ToWorker] = msgspec.json.Decoder(ToWorker)
_to_leader: msgspec.json.Decoder[ToLeader] = msgspec.json.Decoder(ToLeader)


class _Envelope(msgspec.Struct):
    """What every message has: enough to tell an unknown type from a malformed one."""

    type: str


_envelope = msgspec.json.Decoder(_Envelope)
_TAGS = {
    "worker": frozenset(str(t.__struct_config__.tag) for t in ToWorker.__args__),
    "leader": frozenset(str(t.__struct_config__.tag) for t in ToLeader.__args__),
}


class BadMessage(Exception):
    """A message that is not valid JSON, or a known type that does not validate."""


class UnknownMessage(Exception):
    """A well-formed message of a type this version does not know: a newer peer's."""

    def __init__(self, message_type: str) -> None:
        super().__init__(message_type)
        self.message_type = message_type


def encode(message: ToWorker | ToLeader) -> str:
    """`message` in this release's protocol."""
    return _encoder.encode(message).decode()


def encode_for(message: ToWorker | ToLeader, version: int) -> str | None:
    """`message` as a peer of protocol `version` reads it: without the fields added
    since, and with that version in `v`; None when that version has no such message."""
    if version >= PROTOCOL_VERSION:
        return encode(message)
    tag = str(message.__struct_config__.tag)
    doc = msgspec.to_builtins(message)
    for added in range(version + 1, PROTOCOL_VERSION + 1):
        fields = ADDED_IN.get(added, {}).get(tag)
        if fields is not None and not fields:
            return None  # the message type itself came later
        for name in fields or ():
            doc.pop(name, None)
    doc["v"] = version
    return _encoder.encode(doc).decode()


def known_to(message_type: type[ToWorker | ToLeader], version: int) -> bool:
    """Whether a peer of protocol `version` knows this type of message."""
    tag = str(message_type.__struct_config__.tag)
    later = range(version + 1, PROTOCOL_VERSION + 1)
    return not any(ADDED_IN.get(added, {}).get(tag) == frozenset() for added in later)


def protocol_of(header: str | None) -> int | None:
    """The protocol a worker announced in its handshake (none: protocol 1); None when the
    header is not a version number."""
    if header is None:
        return OLDEST_PROTOCOL
    return int(header) if header.isascii() and header.isdigit() and len(header) < 6 else None


def clip(text: str) -> str:
    """`text` cut to fit a text field: an engine's error can carry a proxy's whole page."""
    if len(text) <= TEXT_LIMIT:
        return text
    keep = TEXT_LIMIT - 64  # room for the marker
    return f"{text[:keep]}… ({len(text) - keep} characters cut)"


def decode_for_worker(data: str | bytes) -> ToWorker:
    return _decode(_to_worker, data, "worker")


def decode_for_leader(data: str | bytes) -> ToLeader:
    return _decode(_to_leader, data, "leader")


def _decode(decoder: msgspec.json.Decoder[T], data: str | bytes, reader: str) -> T:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        # Not on the hot path: only a message that failed is looked at again.
        try:
            envelope = _envelope.decode(data)
        except msgspec.DecodeError:
            envelope = None
        if envelope is not None and envelope.type not in _TAGS[reader]:
            raise UnknownMessage(envelope.type[:64]) from None
        raise BadMessage(str(exc)[:200]) from None
    except msgspec.DecodeError as exc:
        raise BadMessage(str(exc)[:200]) from None
