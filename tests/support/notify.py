"""Plays systemd's side of the notify protocol: a datagram socket that records every message."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Message:
    at: float  # time.monotonic() when it arrived
    fields: tuple[str, ...]  # the KEY=value lines

    def has(self, field: str) -> bool:
        return field in self.fields

    def status(self) -> str | None:
        found = [f.removeprefix("STATUS=") for f in self.fields if f.startswith("STATUS=")]
        return found[0] if found else None


class NotifyListener:
    """Binds `address` (a path, or `@name` for an abstract socket) and records datagrams
    from a thread of its own, so arrival times stay true while the sender's loop blocks."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._sock.settimeout(0.1)
        self._messages: list[Message] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                data = self._sock.recv(4096)
                message = Message(time.monotonic(), tuple(data.decode().split("\n")))
                with self._lock:
                    self._messages.append(message)

    @property
    def messages(self) -> list[Message]:
        with self._lock:
            return list(self._messages)

    def with_field(self, field: str) -> list[Message]:
        return [m for m in self.messages if m.has(field)]

    def statuses(self) -> list[str]:
        return [s for m in self.messages if (s := m.status()) is not None]

    async def wait_for(self, field: str, count: int = 1, timeout: float = 30) -> list[Message]:
        async with asyncio.timeout(timeout):
            while len(found := self.with_field(field)) < count:
                await asyncio.sleep(0.05)
        return found

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self._sock.close()
