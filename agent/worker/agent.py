"""The worker agent: enrol once, then hold one link to the leader and act on its orders.

Credentials live in memory only. The link reconnects with capped, jittered backoff;
a revoked node stops for good (exit status 3) instead of knocking forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import platform
import time
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

import aiohttp

from agent import __version__, wire
from agent.backoff import Backoff
from agent.config import Config, WorkerConfig
from agent.credentials import RegistryCredentials
from agent.engine import Engine
from agent.errors import AgentError, ConfigError
from agent.logs import get_logger, redactor
from agent.systemd import Notifier
from agent.worker.identity import (
    Identity,
    enrol,
    load_identity,
    proposed_secret,
    save_identity,
)
from agent.worker.puller import Puller
from agent.worker.releases import Releases, RolledBack
from agent.worker.upgrade import Upgrade, UpgradeFailed

log = get_logger(__name__)
SEND_DEADLINE = 10.0
CONNECT_TIMEOUT = 15.0
# A connect that failed on this host (no route: its own link is down) never reached the
# leader, so trying again costs the leader nothing: keep the pace at a few seconds, and
# the link is back within that once the network is.
OFFLINE_RETRY_CAP = 4.0
# On SIGTERM, pulls under way get this long to finish and answer over the open link
# (the unit's TimeoutStopSec is 30 s); what is left then is answered at the next Sync.
STOP_DRAIN_SECONDS = 20.0
_NO_ROUTE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH})
# A link that ended within this long of its start does not start the backoff over,
# whether the leader closed it or it was lost (no close frame: aiohttp says 1006): a
# leader that accepts each link and closes or drops it at once would otherwise be
# knocked on twice a second, forever. A link that held does: after a network cut or a
# leader's restart, the leader is worth trying again at once.
QUICK_CLOSE_SECONDS = 5.0
# A release on trial that has not reached its leader within this long gives up (exit 1):
# its guard counts the start, and falls back to the previous release after a few.
TRIAL_SECONDS = 60.0
# Closes that say the next try will fail the same way: it waits at the backoff's cap.
_FUTILE_CLOSES = {
    wire.CLOSE_REPLACED: "another agent holds a link with this node's identity "
    "(was the state directory copied to another host?)",
    wire.CLOSE_BAD_MESSAGE: "the leader and this agent could not read each other's messages "
    "(are the leader's and this agent's versions far apart?)",
}


T = TypeVar("T")


class NodeRevoked(AgentError):
    """The leader no longer accepts this node."""


class RestartRequested(AgentError):
    """A new release is installed and current: the agent stops to start again in it."""


class TrialFailed(AgentError):
    """This release, on trial after an upgrade, did not reach its leader in time."""


class LeaderTooOld(AgentError):
    """The leader speaks an older protocol than this worker: it is upgraded first."""

    def __init__(self, leader_protocol: int | str) -> None:
        super().__init__(
            f"the leader speaks protocol {leader_protocol} and this worker "
            f"{wire.PROTOCOL_VERSION}: upgrade the leader first, then restart this worker"
        )


class Worker:
    def __init__(self, config: Config) -> None:
        assert config.worker is not None
        self.config = config
        self.worker_config: WorkerConfig = config.worker
        self.engine = Engine(config.engine.url, timeout=config.engine.timeout)
        self._credentials: RegistryCredentials | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._send_lock = asyncio.Lock()
        self._told_moved = False
        self.releases = Releases.from_environ()
        self._stop: asyncio.Event | None = None
        self._node: Identity | None = None  # once enrolled
        self._upgrade: asyncio.Task[None] | None = None
        self._restart_into: str | None = None
        self._ordered_again = False
        # the upgrade the guard fell back from, and why: never taken again
        self._fell_back: RolledBack | None = None
        self._back_on_leader: asyncio.Event | None = None
        self.puller = Puller(
            self.engine,
            parallel=self.worker_config.max_parallel_pulls,
            retry_budget=self.worker_config.pull_retry_budget,
            credentials=lambda: self._credentials,
            send=self._send,
        )

    async def run(self, stop: asyncio.Event, notifier: Notifier | None = None) -> None:
        """Wait for the engine, enrol if needed, report ready, then hold the link until
        `stop` is set."""
        notifier = notifier or Notifier(None)
        self._stop, self._back_on_leader = stop, asyncio.Event()
        trial = asyncio.create_task(self._watch_trial(stop), name="release-trial")
        try:
            if await self.engine.wait_until_up(stop, notifier.waiting_for_engine) is None:
                return
            identity = await _unless_stopped(stop, self._identity())  # a join takes 60 s at most
            if identity is None:
                return
            redactor.add(identity.secret)
            identity.ssl_for(self.leader_url(identity))  # a refused URL fails before ready
            notifier.ready(self.status_line())
            log.info("agent.ready", role="worker", node_id=identity.node_id)
            self._node = identity
            await self._link_loop(identity, stop)
        finally:
            trial.cancel()
            await self._cancel_upgrade()
            await self.puller.close()
            await self.engine.close()
        if self._restart_into is not None:
            raise RestartRequested(f"restarting into release {self._restart_into}")
        if trial.done() and not trial.cancelled() and trial.result():
            raise TrialFailed(
                f"release {__version__} did not reach its leader within {TRIAL_SECONDS:.0f} s "
                "of its start after an upgrade"
            )

    async def _watch_trial(self, stop: asyncio.Event) -> bool:
        """On trial after an upgrade: stop the agent (True) unless it is back on its
        leader within TRIAL_SECONDS."""
        assert self._back_on_leader is not None
        releases = self.releases
        trial = await asyncio.to_thread(releases.trial) if releases else None
        if trial is None or trial.version != __version__:
            return False
        log.info("upgrade.on_trial", version=trial.version, within_s=TRIAL_SECONDS)
        try:
            async with asyncio.timeout(TRIAL_SECONDS):
                await self._back_on_leader.wait()
        except TimeoutError:
            log.error("upgrade.trial_failed", version=trial.version)
            stop.set()
            return True
        return False

    def status_line(self) -> str:
        """One line for the service manager: the link's state and the pulls under way."""
        link = "connected to" if self._ws is not None else "connecting to"
        return f"worker {link} {self.worker_config.leader_url}: {self.puller.busy} pull(s) running"

    async def _identity(self) -> Identity:
        state = self.config.state_path
        identity = await asyncio.to_thread(load_identity, state)
        if identity is not None:
            return identity
        token = self._join_token()
        secret = await asyncio.to_thread(proposed_secret, state)
        redactor.add(secret)
        identity = await enrol(
            self.worker_config.leader_url, token, self.worker_config.name, secret
        )
        await asyncio.to_thread(save_identity, state, identity)
        return identity

    def _join_token(self) -> str:
        """The join token, needed now: this node has no identity yet."""
        worker, state = self.worker_config, self.config.state_path
        if worker.join_token:
            return worker.join_token
        if worker.join_token_file:
            raise ConfigError(
                f"worker.join_token_file: {worker.join_token_file} does not exist, and "
                f"{state} has no identity: the join token is needed to enrol"
            )
        if worker.join_token_env:
            raise ConfigError(
                f"worker.join_token_env: environment variable {worker.join_token_env} is not "
                f"set or empty, and {state} has no identity: the join token is needed to enrol"
            )
        raise ConfigError(f"worker.join_token: needed to enrol ({state} has no identity)")

    async def _link_loop(self, identity: Identity, stop: asyncio.Event) -> None:
        backoff = Backoff()
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                cap = None
                try:
                    await self._connect(session, identity, stop, backoff)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    log.warning("link.failed", error=repr(exc))
                    cap = OFFLINE_RETRY_CAP if _no_route(exc) else None
                if stop.is_set():
                    return
                delay = backoff.next(cap)
                log.info("link.reconnect", in_s=round(delay, 2), attempt=backoff.attempt)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()

    async def _connect(
        self,
        session: aiohttp.ClientSession,
        identity: Identity,
        stop: asyncio.Event,
        backoff: Backoff,
    ) -> None:
        leader = self.leader_url(identity)
        url = leader.replace("http", "ws", 1) + wire.AGENT_PATH
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):  # TCP, TLS and the upgrade together
                connected = await _unless_stopped(
                    stop,
                    session.ws_connect(
                        url,
                        headers={
                            **identity.auth_header(),
                            wire.PROTOCOL_HEADER: str(wire.PROTOCOL_VERSION),
                        },
                        ssl=identity.ssl_for(leader),
                        heartbeat=wire.HEARTBEAT_SECONDS,
                        timeout=aiohttp.ClientWSTimeout(ws_close=5),
                        max_msg_size=4 * 1024 * 1024,
                        compress=0,
                    ),
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 426:
                said = exc.headers.get(wire.PROTOCOL_HEADER) if exc.headers else None
                raise LeaderTooOld(said or "older") from None
            if exc.status in (401, 403):
                raise NodeRevoked(
                    f"the leader refused this node ({exc.status}): it was revoked or is unknown; "
                    f"clear {self.config.state_path} and enrol with a new join token"
                ) from None
            raise
        if connected is None:
            return  # stopped while connecting: no link, nothing to drain
        connected_at = time.monotonic()
        async with connected as ws:
            self._ws = ws
            log.info("link.connected", leader=leader)
            try:
                await self._send(await self._hello())
                await _until_closed_or(stop, self._read(ws), self.puller.drain(STOP_DRAIN_SECONDS))
            finally:
                self._ws = None
        up_s = time.monotonic() - connected_at
        error = ws.exception()  # why it ended, when the worker saw a fault: no pong in time
        log.info("link.closed", code=ws.close_code, up_s=round(up_s, 1), error=error and str(error))
        if ws.close_code == wire.CLOSE_REVOKED:
            raise NodeRevoked("the leader revoked this node")
        if ws.close_code == wire.CLOSE_LEADER_TOO_OLD:
            raise LeaderTooOld("older")
        _pace_after_close(backoff, ws.close_code, up_s)

    def leader_url(self, identity: Identity) -> str:
        """The config's leader URL: the operator's word wins over the one enrolled with,
        so a leader that moved (with its state, so its CA) is followed by a config edit."""
        url = self.worker_config.leader_url.rstrip("/")
        if url != identity.leader_url.rstrip("/") and not self._told_moved:
            log.warning("link.leader_moved", enrolled_with=identity.leader_url, config=url)
            self._told_moved = True
        return url

    async def _hello(self) -> wire.Hello:
        try:
            info = await self.engine.version()
            engine_version, arch = str(info.get("Version")), str(info.get("Arch"))
        except AgentError:
            engine_version, arch = "unavailable", platform.machine()
        name = self.worker_config.name or platform.node()
        return wire.Hello(
            name=name,
            agent_version=__version__,
            engine_version=engine_version,
            arch=arch,
            upgradable=self.releases is not None,
        )

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.ERROR:  # no pong in time, a message too big…
                log.warning("link.fault", error=str(msg.data))
                break
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            try:
                message = wire.decode_for_worker(msg.data)
            except wire.UnknownMessage as exc:  # a newer leader's: skipped, the link stays
                log.info("link.unknown_message", type=exc.message_type)
                continue
            except wire.BadMessage as exc:
                log.error("link.bad_message", error=str(exc))
                await ws.close(code=wire.CLOSE_BAD_MESSAGE, message=b"bad message")
                return
            if message.v < wire.PROTOCOL_VERSION:
                # A leader of this release speaks this worker's own version; one that
                # speaks an older one did not read the version this worker announced.
                await ws.close(code=wire.CLOSE_LEADER_TOO_OLD, message=b"upgrade the leader")
                raise LeaderTooOld(message.v)
            await self._dispatch(message)

    async def _dispatch(self, message: wire.ToWorker) -> None:
        match message:
            case wire.Credentials():
                await self._take_credentials(message.credentials)
            case wire.Sync():
                await self._take_credentials(message.credentials)
                for image in message.images:
                    self.puller.order(wire.SYNC_ORDER, image)
                await self._back_on_link()
            case wire.PullOrder():
                await self._take_credentials(message.credentials)
                self.puller.order(message.order, message.image)
            case wire.Retain():
                self.puller.retain(message.app, message.keep, message.hold)
            case wire.Inventory():
                self.puller.inventory(message.query, message.images)
            case wire.UpgradeOrder():
                self._start_upgrade(message)

    async def _back_on_link(self) -> None:
        """Linked to the leader and synced: a release on trial has made it (its trial
        ends), and one the guard fell back to tells the leader which release failed."""
        assert self._back_on_leader is not None
        self._back_on_leader.set()
        if self.releases is None:
            return
        await asyncio.to_thread(self.releases.confirm, __version__)
        failed = await asyncio.to_thread(self.releases.take_rolled_back)
        if failed is not None:
            log.warning("upgrade.rolled_back", version=failed.version, why=failed.why)
            self._fell_back = failed
        if self._fell_back is not None:
            await self._send(_rolled_back(self._fell_back))

    def _start_upgrade(self, order: wire.UpgradeOrder) -> None:
        if self._upgrade is not None and not self._upgrade.done():
            log.info("upgrade.already_running", upgrade=order.upgrade)
            self._ordered_again = True  # if this attempt fails, the order stands: again
            return
        self._ordered_again = False
        self._upgrade = asyncio.create_task(self._upgrade_to(order), name="upgrade")

    async def _upgrade_to(self, order: wire.UpgradeOrder) -> None:
        async def report(state: str, detail: str | None) -> None:
            log.info("upgrade.progress", upgrade=order.upgrade, state=state, detail=detail)
            status = wire.UpgradeStatus(
                upgrade=order.upgrade, version=order.version, state=state, detail=detail
            )
            await self._send(status)

        refused = self._refusal(order)
        if refused is not None:
            await report(*refused)
            return
        assert self.releases is not None and self._node is not None
        leader = self.leader_url(self._node)
        for _ in range(2):  # once more if the leader ordered it again meanwhile (a link cut)
            work = Upgrade(order, self.releases, leader, self._node, report)
            try:
                async with asyncio.timeout(order.within_s):
                    await work.run()
                break
            except TimeoutError:
                failure = f"not installed within {order.within_s:.0f} s: the leader gave up"
            except UpgradeFailed as exc:
                failure = exc.message
            except Exception as exc:  # a disk that is full, a directory not writable…
                log.exception("upgrade.crashed", upgrade=order.upgrade)
                failure = f"{type(exc).__name__}: {exc}"
            if not self._ordered_again:
                await report("failed", wire.clip(failure))
                return
            self._ordered_again = False
            log.info("upgrade.again", upgrade=order.upgrade, after=failure)
        await report("restarting", f"into {order.version}")
        self._restart_into = order.version
        assert self._stop is not None
        self._stop.set()

    def _refusal(self, order: wire.UpgradeOrder) -> tuple[str, str] | None:
        """Why this worker does not take `order` (state and detail), or None."""
        if self.releases is None or self._node is None:
            return (
                "unsupported",
                "this worker does not run from the releases layout under its guard: "
                "upgrade it by hand (deploy-agent bootstrap, or a package install)",
            )
        if self._fell_back is not None and self._fell_back.upgrade == order.upgrade:
            return "rolled_back", _rolled_back(self._fell_back).detail or ""
        return None

    async def _cancel_upgrade(self) -> None:
        if self._upgrade is not None and not self._upgrade.done():
            self._upgrade.cancel()
            await asyncio.gather(self._upgrade, return_exceptions=True)

    async def _take_credentials(self, creds: wire.WireCredentials) -> None:
        held = self._credentials.version if self._credentials else 0
        if creds.version < held:
            return
        if creds.server and creds.username and creds.password:
            redactor.add(creds.password)
            self._credentials = RegistryCredentials(
                server=creds.server,
                username=creds.username,
                password=creds.password,
                version=creds.version,
            )
        else:
            self._credentials = None
        await self._send(wire.CredentialsAck(version=creds.version))
        log.info("credentials.updated", version=creds.version)

    async def _send(self, message: wire.ToLeader) -> None:
        """Send on the current link; with none, the leader catches up at the next Sync."""
        ws = self._ws
        if ws is None or ws.closed:
            log.info("link.send_skipped", type=type(message).__name__)
            return
        async with self._send_lock:
            try:
                async with asyncio.timeout(SEND_DEADLINE):
                    await ws.send_str(wire.encode(message))
            except (TimeoutError, ConnectionError, aiohttp.ClientError) as exc:
                log.warning("link.send_failed", error=repr(exc))


def _rolled_back(failed: RolledBack) -> wire.UpgradeStatus:
    return wire.UpgradeStatus(
        upgrade=failed.upgrade or "unknown",
        version=failed.version,
        state="rolled_back",
        detail=f"release {failed.version} {failed.why}; back on {__version__}",
    )


def _pace_after_close(backoff: Backoff, code: int | None, up_s: float) -> None:
    """Start the backoff over after a link that held; keep it growing after one that
    ended at once; wait at its cap after a futile one."""
    futile = _FUTILE_CLOSES.get(code) if code is not None else None
    if futile is not None:
        log.error("link.refused", code=code, reason=futile)
        backoff.to_cap()
    elif up_s >= QUICK_CLOSE_SECONDS:
        backoff.reset()


def _no_route(exc: BaseException) -> bool:
    """Did the connect fail before leaving this host (no route to the leader)?"""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.os_error.errno in _NO_ROUTE
    return isinstance(exc, OSError) and exc.errno in _NO_ROUTE


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[T]) -> T | None:
    """What `work` gives, or None when `stop` is set first (the work is then cancelled):
    a stop does not wait for a slow handshake or join before it can begin."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return None if task.cancelled() else task.result()


async def _until_closed_or(
    stop: asyncio.Event,
    reading: Coroutine[Any, Any, None],
    draining: Coroutine[Any, Any, None],
) -> None:
    """Run the read loop until it ends or `stop` is set. On `stop`, go on reading (the
    link answers its heartbeats) while `draining` runs, then end."""
    read = asyncio.create_task(reading)
    stopped = asyncio.create_task(stop.wait())
    drain: asyncio.Task[None] | None = None
    try:
        await asyncio.wait([read, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not read.done():
            drain = asyncio.create_task(draining)
            await asyncio.wait([read, drain], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if drain is None:
            draining.close()  # never started
        tasks = [read, stopped, *([drain] if drain else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    error = None if read.cancelled() else read.exception()
    if error is not None:
        raise error
