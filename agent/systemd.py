"""The systemd notify protocol over `NOTIFY_SOCKET`, without libsystemd: readiness,
status, stopping (with the time the stop may take), and watchdog pings from the event
loop itself, so a blocked loop stops them. Sending never raises: a manager that stopped
listening must not stop the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable, Mapping

from agent.logs import get_logger

log = get_logger(__name__)
STATUS_REFRESH_SECONDS = 5.0  # the status line is refreshed at least this often
STATUS_MAX_CHARS = 200
Summary = Callable[[], str]


def socket_address(value: str) -> str:
    """`NOTIFY_SOCKET` as a socket address: a leading `@` names an abstract socket."""
    return "\0" + value[1:] if value.startswith("@") else value


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of `WATCHDOG_USEC` in seconds, when the watchdog is meant for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2_000_000


def status_field(text: str) -> str:
    line = " ".join(text.split())
    return "STATUS=" + line[:STATUS_MAX_CHARS]


class Notifier:
    """Tells the service manager how the agent is doing; does nothing outside systemd."""

    def __init__(self, address: str | None, watchdog_every: float | None = None) -> None:
        self._address = socket_address(address) if address else None
        self._sock: socket.socket | None = None
        self.watchdog_every = watchdog_every if address else None
        self.is_ready = False
        self._failing = False
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET") or None, watchdog_interval(environ))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def ready(self, status: str) -> None:
        self.is_ready = True
        self.send("READY=1", status_field(status))

    def status(self, text: str) -> None:
        self.send(status_field(text))

    def waiting_for_engine(self, reason: str) -> None:
        self.status(f"waiting for the Docker Engine: {reason}")

    def send(self, *fields: str) -> None:
        """One datagram of `KEY=value` lines; a failure is logged once, never raised."""
        if self._sock is None or self._address is None or not fields:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            if not self._failing:
                log.warning("systemd.notify_failed", error=repr(exc))
            self._failing = True
            return
        if self._failing:
            log.info("systemd.notify_recovered")
        self._failing = False

    @contextlib.asynccontextmanager
    async def pulse(
        self, stop: asyncio.Event, summary: Summary, stop_within: float | None = None
    ) -> AsyncIterator[None]:
        """Feed the watchdog and refresh the status while the body runs; say STOPPING=1
        as soon as `stop` is set, and, given `stop_within` (seconds), that the stop may
        take that long: systemd then waits at least as long before it kills the agent,
        whatever the unit's TimeoutStopSec. The pinging task is cancelled when the body
        ends."""
        if not self.enabled:
            yield
            return
        pulsing = self._pulse(stop, summary, stop_within)
        task = asyncio.create_task(pulsing, name="systemd-pulse")
        try:
            yield
        finally:
            task.cancel("the agent has stopped")
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _pulse(
        self, stop: asyncio.Event, summary: Summary, stop_within: float | None
    ) -> None:
        tick = min(self.watchdog_every or STATUS_REFRESH_SECONDS, STATUS_REFRESH_SECONDS)
        stopping = False
        shown = ""
        while True:
            fields = ["WATCHDOG=1"] if self.watchdog_every else []
            if stop.is_set() and not stopping:
                stopping = True
                fields.append("STOPPING=1")
                if stop_within is not None:
                    fields.append(f"EXTEND_TIMEOUT_USEC={round(stop_within * 1_000_000)}")
            if self.is_ready or stopping:
                line = ("stopping; " if stopping else "") + summary()
                if line != shown:
                    shown = line
                    fields.append(status_field(line))
            self.send(*fields)
            await _sleep_or_until(tick, None if stopping else stop)


async def _sleep_or_until(seconds: float, event: asyncio.Event | None) -> None:
    if event is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
