"""Websocket text frames as the leader sends them (RFC 6455 section 5.2).

A broadcast goes to every link with the same bytes: a server's frames are not masked and
the leader never compresses, so one frame is built per message and written as it is.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

FIN_TEXT = 0x81


def text_frame(text: str) -> bytes:
    payload = text.encode()
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", FIN_TEXT, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", FIN_TEXT, 126, size)
    else:
        header = struct.pack("!BBQ", FIN_TEXT, 127, size)
    return header + payload


class Outgoing(NamedTuple):
    """A message for the links: its text, and its frame for a write straight to a socket."""

    text: str
    frame: bytes


def outgoing(text: str) -> Outgoing:
    return Outgoing(text, text_frame(text))
