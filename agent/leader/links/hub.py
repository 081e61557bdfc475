"""The leader's side of the worker links: who is connected, what each was sent, and the
answers the distribution stage waits for.

Each link has its own bounded send queue drained by its own task under a deadline, so a
worker that stops reading is dropped and never delays the others. A message to a link
with nothing queued and room in its transport is written at once as a ready-made frame,
skipping the queue. A broadcast is encoded and framed once and sent to every link.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import WSCloseCode, WSMsgType, web

from agent import wire
from agent.credentials import RegistryCredentials
from agent.leader.links.frames import Framed, Outgoing
from agent.leader.links.inventory import InventoriesInFlight
from agent.leader.links.link_socket import LinkSocket
from agent.leader.links.node_writer import NodeInfoWriter
from agent.leader.links.orders import OrdersInFlight, PullRound
from agent.leader.metrics import LeaderMetrics
from agent.leader.state.models import CatchUp, LastPull, NodeRecord
from agent.leader.state.store import Store
from agent.logs import get_logger

log = get_logger(__name__)
SEND_QUEUE = 256
SEND_DEADLINE = 10.0
# What a link's transport holds before its sender waits. asyncio's TLS transport holds
# 512 KiB of its own before it pauses (a plain one, 64 KiB): kept at the plain figure, a
# worker that stops reading costs the leader as little on TLS as on plain links.
WRITE_BUFFER_HIGH = 64 * 1024
CLOSE_DEADLINE = 5.0
# How long a pull round keeps a node whose link dropped: a worker reconnects within a
# second or two of a blip (its first backoff is 0.5 s) and answers on its new link.
RECONNECT_GRACE_S = 5.0
ProgressSink = Callable[[str, wire.PullProgress], Awaitable[None]]
# Why a node has no answer to a pull order: offline when it was ordered, or its link
# dropped before it answered (it was killed, or cut off, mid-pull).
Unanswered = Literal["offline", "disconnected", "late"]
# Told of what a worker says of itself (its Hello) and of its upgrades, as it arrives.
NodeListener = Callable[[NodeRecord, wire.Hello | wire.UpgradeStatus], None]


def wire_credentials(creds: RegistryCredentials | None, version: int) -> wire.WireCredentials:
    if creds is None:
        return wire.WireCredentials(version=version)
    return wire.WireCredentials(
        version=creds.version,
        server=creds.server,
        username=creds.username,
        password=creds.password,
    )


@dataclass(eq=False)
class Link:
    """One connected worker: its socket, its send queue, and how to cut it off."""

    node: NodeRecord
    ws: LinkSocket
    request: web.Request
    protocol: int = wire.PROTOCOL_VERSION  # the one the worker announced: it is spoken to in it
    queue: asyncio.Queue[Outgoing] = field(default_factory=lambda: asyncio.Queue(SEND_QUEUE))
    closing: tuple[int, str] | None = None  # the close code and reason, once kicked
    _stalled: asyncio.TimerHandle | None = None  # cuts a kicked link that does not close

    introduced: bool = False  # its worker has said what it runs (Hello) on this link
    busy: bool = False  # the link's task is dealing with a message
    sending: bool = False  # the pump holds a message it has not finished sending
    _low: int = 0  # the transport's low-water mark
    _transport: asyncio.Transport | None = None  # the connection's, for its whole life

    def __post_init__(self) -> None:
        transport = self._transport = self.request.transport
        if transport is not None:
            transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
            self._low = transport.get_write_buffer_limits()[0]

    def send_framed(self, message: Framed) -> None:
        """Send `message` as this link's version reads it, if that version has it."""
        framed = message.to(self.protocol)
        if framed is not None:
            self.send(framed)

    def send(self, message: Outgoing) -> None:
        if self.closing is not None or self.ws.closed:
            return  # closing: a data frame may not follow the close frame
        if not self.sending and self.queue.empty() and self._writable():
            self._write_now(message)
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("link.queue_full", node=self.node.name)
            self.drop()

    def _writable(self) -> bool:
        """Whether the transport takes a frame now: open, and below its low-water mark (so
        not paused, and no sender of ours would have to wait)."""
        transport = self._transport
        return (
            transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() <= self._low
        )

    def _write_now(self, message: Outgoing) -> None:
        """Write the message's frame straight to the transport: no queue, no pump.

        The frame is whole and written in one call, as aiohttp writes each of its own, so
        frames never interleave; the leader never compresses, so a server frame is the
        same bytes on every link.
        """
        transport = self._transport
        assert transport is not None  # _writable checked it
        transport.write(message.frame)

    async def pump(self) -> None:
        """Send what was queued, one message at a time, each within SEND_DEADLINE."""
        while True:
            message = await self.queue.get()
            if self.closing is not None:
                return  # closing: a data frame may not follow the close frame
            self.sending = True
            try:
                async with asyncio.timeout(SEND_DEADLINE):
                    await self.ws.send_str(message.text)
            except TimeoutError:
                log.warning("link.send_deadline", node=self.node.name, deadline_s=SEND_DEADLINE)
                self.drop()
                return
            except ConnectionError as exc:
                # The link is closing or gone; cutting it could lose a close frame on its way.
                log.info("link.send_failed", node=self.node.name, error=repr(exc))
                return
            self.sending = False

    def drop(self) -> None:
        """Cut a worker that stopped reading: no close handshake, it would not read it."""
        transport = self._transport
        if transport is not None:
            transport.abort()

    def detach(self) -> None:
        """Once the link is over: drop what ties its socket back to it, so the closed
        connection is freed at once, not left for the collector. The hub's message
        taker holds the link, which holds the socket; an exception the socket kept
        holds, through its tracebacks, frames that hold the socket."""
        self.ws.take_text(None)
        _drop_tracebacks(self.ws.exception())

    def kick(self, code: int, reason: str) -> None:
        """Close with `code`. The link's own task sends the close frame once its read
        loop has ended (see `finish`): the worker then gets the close frame with its code
        and answers it before the connection ends. A link not closed within
        CLOSE_DEADLINE (its worker stopped reading, say) is cut off."""
        if self.closing is not None or self.ws.closed:
            return
        self.closing = (code, reason)
        self.ws.end_reading()
        self._stalled = asyncio.get_running_loop().call_later(CLOSE_DEADLINE, self._close_stalled)

    def _close_stalled(self) -> None:
        log.info("link.close_stalled", node=self.node.name, deadline_s=CLOSE_DEADLINE)
        self.drop()

    async def finish(self) -> None:
        """Once the read loop has ended: close a kicked link, and wait for the worker's
        answering close under the deadline; cut the connection if it stalls."""
        if self.closing is None:
            return
        code, reason = self.closing
        try:
            async with asyncio.timeout(CLOSE_DEADLINE):
                await self.ws.close(code=code, message=reason.encode())
        except TimeoutError:
            log.info("link.close_stalled", node=self.node.name, deadline_s=CLOSE_DEADLINE)
            self.drop()
        except (ConnectionError, RuntimeError) as exc:
            log.info("link.close_failed", node=self.node.name, error=repr(exc))
        finally:
            if self._stalled is not None:
                self._stalled.cancel()


def _drop_tracebacks(exc: BaseException | None) -> None:
    """Drop the tracebacks of `exc` and of the exceptions it was raised from or during."""
    pending, seen = [exc], set()
    while pending:
        exc = pending.pop()
        if exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            exc.__traceback__ = None
            pending += (exc.__cause__, exc.__context__)


class Hub:
    def __init__(self, store: Store, progress: ProgressSink, metrics: LeaderMetrics) -> None:
        self._store = store
        self._nodes = NodeInfoWriter(store)
        self._metrics = metrics
        self._progress = progress
        self._links: dict[str, Link] = {}
        self._orders = OrdersInFlight()
        self._inventories = InventoriesInFlight()
        self._credentials: RegistryCredentials | None = None
        self._credentials_version = 0
        self._revoked: set[str] = set()  # revoked while this leader runs
        self._listeners: list[NodeListener] = []

    def listen(self, listener: NodeListener) -> None:
        self._listeners.append(listener)

    def send_to(self, node_id: str, message: wire.ToWorker) -> bool:
        """Send `message` to one node in its link's version; False when it is not linked,
        or its version has no such message."""
        link = self._links.get(node_id)
        framed = Framed(message).to(link.protocol) if link is not None else None
        if link is None or framed is None:
            return False
        link.send(framed)
        return True

    def introduced(self, node_id: str) -> bool:
        """Whether the node is linked and has said what it runs on this link."""
        link = self._links.get(node_id)
        return link is not None and link.introduced

    def node(self, node_id: str) -> NodeRecord | None:
        """A linked node's record, as its link keeps it up to date."""
        link = self._links.get(node_id)
        return link.node if link is not None else None

    def connected(self, node_id: str) -> bool:
        return node_id in self._links

    @property
    def connected_count(self) -> int:
        return len(self._links)

    def set_credentials(self, creds: RegistryCredentials | None, version: int) -> None:
        """Remember the credentials in force and send them to every connected worker."""
        self._credentials, self._credentials_version = creds, version
        self.broadcast(wire.Credentials(credentials=self._wire_credentials()))

    def _wire_credentials(self) -> wire.WireCredentials:
        return wire_credentials(self._credentials, self._credentials_version)

    def broadcast(self, message: wire.ToWorker) -> None:
        """Queue one message, encoded once per protocol version, to every connected worker."""
        framed = Framed(message)
        for link in list(self._links.values()):
            link.send_framed(framed)

    def revoke(self, node_id: str, name: str) -> None:
        """Close the node's link, and refuse any link of it still being set up: its
        revocation may land between that link's authentication and its first message.
        Its failure count goes from the metrics: nodes come and go under their own
        names (autoscaled hosts), and each name kept would be a series for good."""
        self._revoked.add(node_id)
        self._orders.drop(node_id, 0.0)  # no place kept for it, if its link dropped already
        self.kick(node_id, wire.CLOSE_REVOKED, "this node was revoked")
        with contextlib.suppress(KeyError):
            self._metrics.pull_failures.remove(name)

    def kick(self, node_id: str, code: int, reason: str) -> None:
        link = self._links.get(node_id)
        if link is not None:
            link.kick(code, reason)

    async def serve(
        self,
        node: NodeRecord,
        ws: LinkSocket,
        request: web.Request,
        protocol: int = wire.PROTOCOL_VERSION,
    ) -> None:
        """Own one worker's link, spoken to in `protocol`, from its first message to its close."""
        if node.id in self._revoked:
            await ws.close(code=wire.CLOSE_REVOKED, message=b"this node was revoked")
            return
        node.info = self._nodes.pending(node.id) or node.info
        link = Link(node, ws, request, protocol)
        previous = self._links.get(node.id)
        if previous is not None:
            previous.kick(wire.CLOSE_REPLACED, "replaced by a newer connection")
            self._orders.drop(node.id, RECONNECT_GRACE_S)  # its answer comes on this link
        self._links[node.id] = link
        pump = asyncio.create_task(link.pump(), name=f"link-pump-{node.name}")
        log.info("link.connected", node=node.name, protocol=protocol)
        try:
            link.send_framed(await self._sync())
            await self._read(link)
        except ConnectionError as exc:
            log.info("link.broken", node=node.name, error=repr(exc))
        finally:
            # Forget the link first: from here on nothing may wait for its answers. A
            # link replaced by a newer one leaves the node, its orders and its info to it.
            current = self._links.get(node.id) is link
            if current:
                del self._links[node.id]
                revoked = node.id in self._revoked  # it will not be back
                self._orders.drop(node.id, 0.0 if revoked else RECONNECT_GRACE_S)
                self._inventories.drop(node.id)
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            try:
                await link.finish()
            finally:
                link.detach()  # on a stop's cancellation too
            if current:
                self._touch(node)
            log.info("link.disconnected", node=node.name, code=ws.close_code, replaced=not current)

    async def _sync(self) -> Framed:
        images = await self._store.images_to_hold()
        return Framed(wire.Sync(credentials=self._wire_credentials(), images=images))

    async def _read(self, link: Link) -> None:
        """Deal with what the link's socket did not hand over as it arrived: the
        messages that need waiting for, those that do not parse, and frames of other
        types."""
        link.ws.take_text(lambda text: self._take(link, text))
        async for msg in link.ws:
            if msg.type != WSMsgType.TEXT:
                link.kick(wire.CLOSE_BAD_MESSAGE, "text frames only")
                return
            try:
                message = wire.decode_for_leader(msg.data)
            except wire.UnknownMessage as exc:  # a newer worker's: not a reason to drop it
                log.info("link.unknown_message", node=link.node.name, type=exc.message_type)
                continue
            except wire.BadMessage as exc:
                log.warning("link.bad_message", node=link.node.name, error=str(exc))
                link.kick(wire.CLOSE_BAD_MESSAGE, str(exc)[:120])
                return
            link.busy = True
            try:
                await self._dispatch(link, message)
            finally:
                link.busy = False

    def _take(self, link: Link, text: str) -> bool:
        """Deal with a message as it arrives if that needs no waiting; False to leave it
        to the link's task (a message that does not parse, too, so the task reports it)."""
        if link.busy:
            return False  # the task is still on an earlier message
        try:
            message = wire.decode_for_leader(text)
        except (wire.BadMessage, wire.UnknownMessage):
            return False  # the link's task reports it
        try:
            return self._handle(link, message) is None
        except Exception:  # a bug here must not reach aiohttp's parser, which would hide it
            log.exception("link.message_failed", node=link.node.name)
            link.kick(WSCloseCode.INTERNAL_ERROR, "the leader failed on this message")
            return True

    async def _dispatch(self, link: Link, message: wire.ToLeader) -> None:
        if (progress := self._handle(link, message)) is not None:
            await self._progress(link.node.name, progress)

    def _handle(self, link: Link, message: wire.ToLeader) -> wire.PullProgress | None:
        """Deal with a message that needs no waiting; a progress report to be passed on
        (which means waiting) is given back instead."""
        node = link.node
        match message:
            case wire.Hello():
                node.info.agent_version = message.agent_version
                node.info.engine_version = message.engine_version
                node.info.arch = message.arch
                node.info.protocol = link.protocol
                node.info.upgradable = message.upgradable
                link.introduced = True
                self._touch(node)
                self._tell(node, message)
            case wire.UpgradeStatus():
                self._touch(node)
                self._tell(node, message)
            case wire.CredentialsAck():
                node.info.credentials_version = message.version
                self._touch(node)
            case wire.PullProgress() if self._orders.owed(node.id, message.order):
                return message
            case wire.PullResult():
                node.info.last_pull = LastPull(
                    image=message.image,
                    ok=message.ok,
                    error=message.error,
                    seconds=message.seconds,
                    at=time.time(),
                )
                self._orders.answer(node.id, message)
                if message.order == wire.SYNC_ORDER and message.ok:
                    self._nodes.caught_up(
                        CatchUp(node.name, message.image, message.seconds, time.time())
                    )
                self._touch(node)
                self._count_pull(link, message)
            case wire.Holding():
                self._inventories.answer(node.id, message)
        return None

    def _tell(self, node: NodeRecord, message: wire.Hello | wire.UpgradeStatus) -> None:
        for listener in self._listeners:
            listener(node, message)

    def _count_pull(self, link: Link, result: wire.PullResult) -> None:
        if result.ok:
            self._metrics.pull_seconds.observe(result.seconds)
        else:
            self._metrics.pull_failures.labels(node=link.node.name).inc()

    def observe(self) -> None:
        """Refresh the link gauges; called when Prometheus scrapes."""
        metrics = self._metrics
        metrics.workers_connected.set(len(self._links))
        metrics.credentials_current.set(self._credentials_version)
        metrics.send_queue.clear()
        metrics.credentials_version.clear()
        metrics.last_pull_seconds.clear()
        for link in self._links.values():
            name, info = link.node.name, link.node.info
            metrics.send_queue.labels(node=name).set(link.queue.qsize())
            if info.credentials_version is not None:
                metrics.credentials_version.labels(node=name).set(info.credentials_version)
            pull = info.last_pull
            if pull is not None and pull.ok and pull.seconds is not None:
                metrics.last_pull_seconds.labels(node=name).set(pull.seconds)

    def _touch(self, node: NodeRecord) -> None:
        node.info.last_seen = time.time()
        self._nodes.mark(node)

    async def flush(self) -> None:
        """Write what the links learnt about nodes; call before reading the node table."""
        await self._nodes.flush()

    async def pull_everywhere(
        self, order: str, image: str, nodes: list[NodeRecord], *, within: float | None = None
    ) -> dict[str, wire.PullResult | Unanswered]:
        """Order every connected node to pull `image`; wait for each answer, for up to
        `within` seconds.

        A node that is offline maps to "offline"; one whose link drops before it
        answers, to "disconnected"; one still owing its answer after `within`, to "late".
        """
        framed = Framed(
            wire.PullOrder(order=order, image=image, credentials=self._wire_credentials())
        )
        linked = [link for node in nodes if (link := self._links.get(node.id)) is not None]
        pull_round = PullRound(order, {link.node.id for link in linked}, image)
        self._orders.open(pull_round)
        try:
            for link in linked:
                link.send_framed(framed)
            await asyncio.wait([pull_round.settled], timeout=within)
            return {node.id: _answer(pull_round, node.id) for node in nodes}
        finally:
            self._orders.close(pull_round)

    async def inventory(self, images: list[str], within: float) -> dict[str, frozenset[str]]:
        """Ask every connected worker whose protocol has it which of `images` its engine
        holds; wait up to `within` seconds. A node id missing from the answer is unknown:
        offline, of the previous protocol, or silent until then."""
        links = self._links.values()
        asked = [link for link in links if wire.known_to(wire.Inventory, link.protocol)]
        inventory_round = self._inventories.open({link.node.id for link in asked})
        try:
            framed = Framed(wire.Inventory(query=inventory_round.query, images=images))
            for link in asked:
                link.send_framed(framed)
            await asyncio.wait([inventory_round.settled], timeout=within)
            return dict(inventory_round.answers)
        finally:
            self._inventories.close(inventory_round)

    async def close_all(self) -> None:
        for link in list(self._links.values()):
            link.kick(wire.CLOSE_SHUTDOWN, "leader shutting down")

    async def close(self) -> None:
        """After the links are gone: write the last node info while the store is open."""
        await self._nodes.close()


def _answer(pull_round: PullRound, node_id: str) -> wire.PullResult | Unanswered:
    if node_id not in pull_round.ordered:
        return "offline"
    if (answer := pull_round.answers.get(node_id)) is not None:
        return answer
    if node_id in pull_round.answers:  # its link dropped, and no answer came after
        return "disconnected"
    return "late"
