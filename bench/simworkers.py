"""Simulated workers for the hub benchmarks: many real websocket clients in one process.

    python -m bench.simworkers SPEC.json

Each client speaks the worker's protocol (agent.wire) as agent/worker/agent.py does:
Hello on connect, a CredentialsAck for every Sync or Credentials, and for every PullOrder
an immediate successful PullResult (it pulls nothing). A dropped link reconnects with the
worker's own backoff. SIGTERM closes every link and ends the process.

The simulated workers stand for other machines, yet share this machine's cores with the
leader: every microsecond they spend is one the leader does not get. So a client answers
each message as aiohttp's parser yields it, with a frame written straight to its socket
(the leader's own way of taking answers, agent/leader/links/link_socket.py), instead of
waking a task per message. Clients that stop reading or cycle read in a loop, as a
worker does, and write their answers the same way; a client never compresses (the
leader declines permessage-deflate).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.client
import msgspec
import uvloop

from agent import wire
from agent.backoff import Backoff
from agent.leader.links.frames import text_frame
from agent.leader.links.link_socket import TakingQueue

FIRST_CONNECTS = 64  # handshakes under way at once when the fleet starts
STUCK_RCVBUF = 4096


class FleetSpec(msgspec.Struct, frozen=True, kw_only=True):
    url: str  # the leader's base URL, http:// or https://
    identities: list[tuple[str, str]]  # (node_id, secret)
    ca_pem: str | None = None
    stuck: int = 0  # this many clients stop reading once their first Sync is answered
    stuck_for: float = 0.0  # then read again after this long (0: never), as a process
    # frozen for a while would: one whose link the leader cut meanwhile reconnects
    cycles: int = 0  # 0: stay connected; else connect, sync, close this many times
    heartbeat: bool = True
    deflate: bool = False  # offer permessage-deflate, as aiohttp clients do by default


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def answer(message: wire.ToWorker) -> wire.ToLeader | None:
    """What a worker that pulls instantly says back."""
    match message:
        case wire.Sync() | wire.Credentials():
            return wire.CredentialsAck(version=message.credentials.version)
        case wire.PullOrder():
            return wire.PullResult(order=message.order, image=message.image, ok=True)
    return None


def masked_frame(text: str) -> bytes:
    """A client's text frame: masked, with a key of its own."""
    return text_frame(text, mask=os.urandom(4))


def _hello(node_id: str) -> str:
    return wire.encode(
        wire.Hello(name=node_id, agent_version="bench", engine_version="none", arch="x86_64")
    )


class SimWorker:
    def __init__(self, spec: FleetSpec, node_id: str, secret: str, *, stuck: bool) -> None:
        self.spec = spec
        self.node_id = node_id
        self.headers = {"Authorization": f"Node {node_id}:{secret}"}
        self.stuck = stuck
        self.url = spec.url.replace("http", "ws", 1) + wire.AGENT_PATH

    async def run(
        self, session: aiohttp.ClientSession, tls: ssl.SSLContext | bool, first: asyncio.Semaphore
    ) -> None:
        backoff = Backoff()
        rounds = 0
        while self.spec.cycles == 0 or rounds < self.spec.cycles:
            try:
                async with first if rounds == 0 else contextlib.nullcontext():
                    ws = await self._connect(session, tls)
                backoff.reset()
                await self._serve(ws)
                rounds += 1
                if self.spec.cycles:
                    continue
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(backoff.next())

    async def _connect(
        self, session: aiohttp.ClientSession, tls: ssl.SSLContext | bool
    ) -> aiohttp.ClientWebSocketResponse:
        return await session.ws_connect(
            self.url,
            headers=self.headers,
            ssl=tls,
            heartbeat=wire.HEARTBEAT_SECONDS if self.spec.heartbeat and not self.stuck else None,
            timeout=aiohttp.ClientWSTimeout(ws_close=5),
            max_msg_size=4 * 1024 * 1024,
            compress=15 if self.spec.deflate else 0,
        )

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async with ws:
            await ws.send_str(_hello(self.node_id))
            if not self.stuck and not self.spec.cycles:
                _answer_as_parsed(ws)
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return
                reply = answer(wire.decode_for_worker(msg.data))
                if reply is not None:
                    _send_now(ws, reply)
                if isinstance(reply, wire.CredentialsAck) and self.spec.cycles:
                    return
                if self.stuck:
                    _stop_reading(ws, self.spec.stuck_for)


def _send_now(ws: aiohttp.ClientWebSocketResponse, reply: wire.ToLeader) -> None:
    """Write a whole frame at once: no wait between a message and its answer, so answers
    keep the order of the messages whether the parser's taker or the task sent them.
    Nothing is sent once the client has begun to close: no data frame after its close."""
    transport = ws._writer.transport
    if not ws.closed and not transport.is_closing():
        transport.write(masked_frame(wire.encode(reply)))


def _answer_as_parsed(ws: aiohttp.ClientWebSocketResponse) -> None:
    queue = ws._reader
    assert isinstance(queue, TakingQueue), "aiohttp's client queue was not replaced"

    def take(text: str) -> bool:
        reply = answer(wire.decode_for_worker(text))
        if reply is not None:
            _send_now(ws, reply)
        return True

    queue.taker = take


def _stop_reading(ws: aiohttp.ClientWebSocketResponse, resume_after: float) -> None:
    """Behave like a frozen process: the kernel buffers fill and nothing is read."""
    conn = ws._conn  # the raw transport, to pause it
    if conn is None or conn.transport is None:
        raise RuntimeError("the stuck client found no transport to pause")
    sock = conn.transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STUCK_RCVBUF)
    conn.transport.pause_reading()
    if resume_after:
        asyncio.get_running_loop().call_later(resume_after, conn.transport.resume_reading)


def client_tls(ca_pem: str | None) -> ssl.SSLContext | bool:
    if ca_pem is None:
        return False
    context = ssl.create_default_context(cadata=ca_pem)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def run_fleet(spec: FleetSpec) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tls = client_tls(spec.ca_pem)
    first = asyncio.Semaphore(FIRST_CONNECTS)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        workers = [
            SimWorker(spec, node_id, secret, stuck=i < spec.stuck)
            for i, (node_id, secret) in enumerate(spec.identities)
        ]
        tasks = [asyncio.create_task(w.run(session, tls, first)) for w in workers]
        everyone = asyncio.gather(*tasks)
        stopped = asyncio.create_task(stop.wait())
        either: list[asyncio.Future[Any]] = [everyone, stopped]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        everyone.cancel()
        stopped.cancel()
        await asyncio.gather(everyone, stopped, return_exceptions=True)


def main() -> None:
    """uvloop here is the harness's, not the leader's: the simulated workers would be other
    machines, so the less CPU they take from the leader's, the truer the figures."""
    raise_fd_limit()
    # Every client websocket of this process gets a queue whose messages can be taken.
    setattr(aiohttp.client, "WebSocketDataQueue", TakingQueue)  # noqa: B010
    spec = msgspec.json.decode(Path(sys.argv[1]).read_bytes(), type=FleetSpec)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run_fleet(spec))


if __name__ == "__main__":
    main()
