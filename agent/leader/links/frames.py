"""Websocket text frames as the leader sends them (RFC 6455 section 5.2).

A broadcast goes to every link with the same bytes: a server's frames are not masked and
the leader never compresses, so one frame is built per message and written as it is.
A client masks every frame it sends, with a key of its own per frame: `mask` gives one
(the simulated workers of the benchmarks write their answers this way).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from aiohttp._websocket.helpers import websocket_mask

from agent import wire

FIN_TEXT = 0x81
MASKED = 0x80


def text_frame(text: str, *, mask: bytes | None = None) -> bytes:
    payload = text.encode()
    size = len(payload)
    masked = MASKED if mask is not None else 0
    if size < 126:
        header = struct.pack("!BB", FIN_TEXT, masked | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", FIN_TEXT, masked | 126, size)
    else:
        header = struct.pack("!BBQ", FIN_TEXT, masked | 127, size)
    if mask is None:
        return header + payload
    masking = bytearray(payload)
    websocket_mask(mask, masking)
    return header + mask + masking


class Outgoing(NamedTuple):
    """A message for the links: its text, and its frame for a write straight to a socket."""

    text: str
    frame: bytes


def outgoing(text: str) -> Outgoing:
    return Outgoing(text, text_frame(text))


class Framed:
    """One message as each protocol version reads it, encoded and framed once per version
    asked for: a broadcast to links of mixed versions encodes each version once."""

    def __init__(self, message: wire.ToWorker) -> None:
        self._message = message
        self._by_version: dict[int, Outgoing | None] = {}

    def to(self, version: int) -> Outgoing | None:
        """The message for a link of `version`; None when that version has no such message."""
        try:
            return self._by_version[version]
        except KeyError:
            text = wire.encode_for(self._message, version)
            framed = self._by_version[version] = None if text is None else outgoing(text)
            return framed
