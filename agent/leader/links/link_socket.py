"""The leader's websocket for a worker link: a text message may be taken as it is parsed.

aiohttp hands each received message to the task awaiting `receive()`: a queue entry, a
future resolved, a task woken, per message. Most of a worker's messages need no waiting
to be dealt with (an acknowledgement is a few field updates), so the hub may take them at
once, as the parser yields them, and the task then wakes only for the rest: messages the
hub declines, and the control frames (ping, pong, close), which aiohttp keeps handling.

This reaches into aiohttp's websocket internals (the response's reader and parser); the
pinned aiohttp range in pyproject.toml is the one it is written against, and a test
checks that taken messages skip the queue.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web
from aiohttp._websocket.reader import WebSocketDataQueue
from aiohttp.helpers import DEFAULT_CHUNK_SIZE
from aiohttp.http import WS_CLOSED_MESSAGE, WebSocketReader

if TYPE_CHECKING:
    from aiohttp.web_request import BaseRequest

# Takes a text message now and says so, or declines it (False): the message is then
# queued for `receive()` as aiohttp would.
TextTaker = Callable[[str], bool]


class TakingQueue(WebSocketDataQueue):
    """aiohttp's message queue, offering each text message to a taker first, as long as
    nothing is queued ahead of it (so messages are still dealt with in order)."""

    taker: TextTaker | None = None

    def end_reading(self) -> None:
        """Queue, behind what is queued, a message that ends the reader's `async for`
        without marking the socket as closing (see LinkSocket.end_reading)."""
        self.taker = None
        super().feed_data(WS_CLOSED_MESSAGE, 0)

    def feed_data(self, data: Any, size: int) -> None:
        taker = self.taker
        if (
            taker is not None
            and data.type is WSMsgType.TEXT
            and not self._buffer
            and taker(data.data)
        ):
            return
        super().feed_data(data, size)


class LinkSocket(web.WebSocketResponse):
    """A server websocket whose text messages a taker may deal with as they arrive.

    Its heartbeat is aiohttp's (a ping after a heartbeat with nothing heard, the link cut
    if no pong follows within half of one), kept without aiohttp's loop callback after
    every read: a read only notes the time, and the heartbeat timer, when it fires early,
    is set again for a heartbeat after the last thing heard.
    """

    _taking: TakingQueue | None = None
    _clock: Callable[[], float] = staticmethod(lambda: 0.0)
    _heard: Heard | None = None  # when the peer last sent anything
    _pinged_at = 0.0

    def end_reading(self) -> None:
        """End the read loop (`async for` over this socket) once it has dealt with what
        came before, so that its own task can then close the link.

        aiohttp's close(), called while another task waits in receive(), marks the socket
        as closing and cuts the connection right after its close frame, without waiting
        for the peer's answering close: the peer, whose answer then cannot be written,
        sees code 1006 (connection lost) in place of the one sent. Called from the task
        that reads, close() waits for that answer as RFC 6455 has it."""
        assert self._taking is not None, "end_reading before prepare"
        self._taking.end_reading()

    def take_text(self, taker: TextTaker | None) -> None:
        """Offer every text message to `taker` from now on (None: stop offering)."""
        assert self._taking is not None, "take_text before prepare"
        self._taking.taker = taker

    def _post_start(self, request: BaseRequest, protocol: str | None, writer: Any) -> None:
        """aiohttp's own, with the taking queue in place of its queue (the parser can be
        set only once, so this cannot call aiohttp's and then swap)."""
        self._ws_protocol, self._writer = protocol, writer
        assert self._loop is not None
        self._clock = self._loop.time
        heard = self._heard = Heard(self._clock)
        self._reset_heartbeat()
        queue = TakingQueue(request._protocol, DEFAULT_CHUNK_SIZE, loop=self._loop)
        parser = WebSocketReader(
            queue, self._max_msg_size, compress=bool(self._compress), decode_text=True
        )
        self._reader, self._parser, self._taking = queue, parser, queue
        received = None if self._heartbeat is None else heard
        request.protocol.set_parser(parser, data_received_cb=received)
        request.protocol.keep_alive(False)  # as aiohttp: no HTTP keep-alive under a websocket

    def _heard_at(self) -> float:
        return self._heard.at if self._heard is not None else 0.0

    def _send_heartbeat(self) -> None:
        assert self._loop is not None and self._heartbeat is not None
        due = self._heard_at() + self._heartbeat
        if due > self._clock():
            self._heartbeat_cb = self._loop.call_at(due, self._send_heartbeat)
            return
        self._pinged_at = self._clock()
        super()._send_heartbeat()

    def _pong_not_received(self) -> None:
        if self._heard_at() >= self._pinged_at:  # a pong, or anything else, came after the ping
            self._pong_response_cb = None
            # the next ping a heartbeat after that, not after this deadline: a peer that
            # falls silent now is then cut 1.5 heartbeats after it was last heard
            assert self._loop is not None and self._heartbeat is not None
            due = self._heard_at() + self._heartbeat
            if self._heartbeat_cb is not None:
                self._heartbeat_cb.cancel()
            self._heartbeat_cb = self._loop.call_at(due, self._send_heartbeat)
            return
        super()._pong_not_received()


class Heard:
    """When a connection last heard from its peer: aiohttp's protocol calls it on every
    read. Not a method of the socket: the protocol outlives its connection's end holding
    this callback, and a bound method would make the socket, its request and the protocol
    a reference cycle, each closed link's memory then waiting for a full collection."""

    __slots__ = ("_clock", "at")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.at = clock()

    def __call__(self) -> None:
        self.at = self._clock()
