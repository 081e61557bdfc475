"""Assembles the leader and runs its lifecycle.

Start order: state-dir lock, store, engine, registry, scheduler, HTTP site.
Stop order is the reverse: stop accepting, drain deployments under a deadline,
cancel what is left, close the engine and the store, release the lock.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import fcntl
import functools
import gc
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import IO

from aiohttp import web

from agent import wire
from agent.config import Config, LeaderConfig
from agent.engine import Engine
from agent.errors import AgentError, ConfigError
from agent.files import others_may_read
from agent.leader.api import (
    apps,
    cluster,
    deployments,
    middleware,
    nodes,
    openapi,
    registry,
    upgrades,
)
from agent.leader.api.keys import CONTEXT, ROLLOUTS, SCHEDULER
from agent.leader.api.malformed import ApiRunner
from agent.leader.certs import ServingCertificate
from agent.leader.links.hub import Hub, ProgressSink
from agent.leader.links.upgrades import Rollouts
from agent.leader.metrics import LeaderMetrics
from agent.leader.pipeline.build_server import Builders
from agent.leader.pipeline.context import LeaderContext
from agent.leader.pipeline.release import ensure_swarm
from agent.leader.pipeline.scheduler import INTERRUPT_GRACE_S, Scheduler
from agent.leader.pipeline.sources import sweep_contexts
from agent.leader.registry.credentials import RegistryService
from agent.leader.registry.password_command import PasswordRefresher
from agent.leader.registry.seed import seed_registry, seed_until_set
from agent.leader.state.history import prune_history_every
from agent.leader.state.journal import Journal
from agent.leader.state.store import Store
from agent.leader.webhooks import WebhookSender
from agent.logs import get_logger
from agent.memory import release_free_memory_every
from agent.tls import LeaderTLS, default_names, ensure_leader_tls

log = get_logger(__name__)
JSON_BODY_LIMIT = 1024 * 1024
# On asyncio's loop (the daemon's is uvloop, which has its own), every TLS connection gets
# a read buffer of this size, zeroed up front (256 KiB as shipped: most of an idle worker
# link's memory). TLS records carry at most 16 KiB; at this size an idle TLS link costs
# the leader 60 KiB (64 KiB buffers: 109 KiB), and an upload is read at about 110 MB/s on
# loopback (64 KiB buffers: 190 MB/s).
TLS_READ_BUFFER = 16 * 1024
GC_YOUNG_THRESHOLD = 20_000
# The HTTP server's wait for a handler that is still running when it shuts down; it
# waits twice, before and after cancelling the handler. The worker links close within it.
SHUTDOWN_TIMEOUT_S = 5.0
# What a stop takes past the drain and an interrupted release's grace: the HTTP server's
# shutdown, then a margin for writing the last node info and closing engine and store.
CLOSE_AFTER_DRAIN_S = 2 * SHUTDOWN_TIMEOUT_S + 5.0
# Connections waiting to be accepted (aiohttp's default is 128; the kernel caps it at
# net.core.somaxconn). Thousands of workers reconnect at once after a leader restart:
# past the backlog the kernel drops their handshakes and they wait out a retransmit.
LISTEN_BACKLOG = 4096
# An upload's fields travel in the query string (the body is the build context), and
# its services' JSON can pass aiohttp's 8,190-byte request line.
REQUEST_LINE_LIMIT = 128 * 1024


def build_app(ctx: LeaderContext, scheduler: Scheduler, rollouts: Rollouts) -> web.Application:
    app = web.Application(
        middlewares=[middleware.errors, middleware.bearer_auth(ctx.config.api_token)],
        client_max_size=JSON_BODY_LIMIT,
    )
    app[CONTEXT] = ctx
    app[SCHEDULER] = scheduler
    app[ROLLOUTS] = rollouts
    for table in (
        deployments.routes,
        apps.routes,
        registry.routes,
        cluster.routes,
        nodes.routes,
        upgrades.routes,
        openapi.routes,
    ):
        app.router.add_routes(table)
    return app


class Leader:
    def __init__(self, config: Config) -> None:
        assert config.leader is not None
        self.config = config
        self.leader_config: LeaderConfig = config.leader
        self._lock_file: IO[str] | None = None
        self._runner: web.AppRunner | None = None
        self._scheduler_task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self._webhook_task: asyncio.Task[None] | None = None
        self._trim_task: asyncio.Task[None] | None = None
        self._password_task: asyncio.Task[None] | None = None
        self._seed_task: asyncio.Task[None] | None = None
        self._cert_task: asyncio.Task[None] | None = None
        self._history_task: asyncio.Task[None] | None = None
        self.ctx: LeaderContext | None = None
        self.scheduler: Scheduler | None = None
        self.rollouts: Rollouts | None = None

    async def start(self) -> None:
        if self.leader_config.build_server is not None:
            self.leader_config.build_server.check_files()
        state = self.config.state_path
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_file = _lock_state_dir(state)
        hooks = self.leader_config.webhooks
        store = Store(state / "leader.db", tuple(hook.url for hook in hooks))
        await store.open()
        sender = WebhookSender(store, hooks)
        await sender.abandon_removed()
        engine = Engine(self.config.engine.url, timeout=self.config.engine.timeout)
        builders = Builders(
            engine, self.leader_config.build_server, state, self.config.engine.timeout
        )
        reg = RegistryService(store, engine, build_server=builders.remote)
        await reg.load()
        journal = Journal(store, sender.wake)
        metrics = LeaderMetrics()
        hub = Hub(store, _pull_progress(journal), metrics)
        reg.on_change(hub.set_credentials)
        tls = await asyncio.to_thread(_leader_tls, self.leader_config, state)
        ctx = LeaderContext(
            self.leader_config, state, store, journal, engine, reg, hub, tls, metrics, builders
        )
        self.ctx = ctx
        ctx.contexts_dir.mkdir(mode=0o700, exist_ok=True)
        await self._sweep_contexts(ctx)
        await self._check_engine(engine)
        await self._seed_registry(reg)
        self.scheduler = Scheduler(ctx)
        self.rollouts = Rollouts(store, hub, journal, state / "upgrades")
        # Listen first: a leader that cannot serve (its port taken, say) must not start
        # deployments, each start counting as an attempt, only to interrupt them.
        await self._serve(build_app(ctx, self.scheduler, self.rollouts), tls)
        await self.rollouts.resume()
        self._scheduler_task = asyncio.create_task(self.scheduler.run(), name="scheduler")
        self._lag_task = asyncio.create_task(metrics.watch_loop_lag(), name="loop-lag")
        self._trim_task = asyncio.create_task(
            release_free_memory_every(self.leader_config.memory_trim_interval), name="trim"
        )
        self._history_task = asyncio.create_task(
            prune_history_every(store, self.leader_config.history_days), name="history"
        )
        if hooks:
            self._webhook_task = asyncio.create_task(sender.run(), name="webhooks")
        seed = self.config.registry
        if seed is not None and seed.password_command is not None:
            refresher = PasswordRefresher(seed, reg)
            self._password_task = asyncio.create_task(refresher.run(), name="registry-password")

    async def _sweep_contexts(self, ctx: LeaderContext) -> None:
        """Before anything runs: free the disk a stop in the middle of an upload, a clone
        or a deployment's end left taken."""
        unfinished = {dep.id for dep in await ctx.store.unfinished()}
        removed = await asyncio.to_thread(sweep_contexts, ctx.contexts_dir, unfinished)
        if removed:
            log.info("contexts.swept", removed=len(removed), names=removed[:20])

    async def _check_engine(self, engine: Engine) -> None:
        try:
            info = await engine.version()
            log.info("engine.ready", url=engine.url, version=info.get("Version"))
            if self.leader_config.swarm_init:
                cfg = self.leader_config
                await ensure_swarm(engine, cfg.swarm_listen_addr, cfg.swarm_advertise_addr)
        except AgentError as exc:
            log.error("engine.unavailable", url=engine.url, error=exc.message)

    async def _seed_registry(self, reg: RegistryService) -> None:
        seed = self.config.registry
        if seed is None or seed.password is None:  # a password_command is run once serving
            return
        if not await seed_registry(seed, reg):
            self._seed_task = asyncio.create_task(seed_until_set(seed, reg), name="registry-seed")

    async def _serve(self, app: web.Application, tls: LeaderTLS | None) -> None:
        cfg = self.leader_config
        self._runner = ApiRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            max_line_size=REQUEST_LINE_LIMIT,
        )
        await self._runner.setup()
        ssl_context = None
        if tls is not None:
            serving = ServingCertificate(tls, self._renewal())
            ssl_context = serving.listening
            self._cert_task = asyncio.create_task(serving.keep_current(), name="certificate")
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
        site = web.TCPSite(
            self._runner, cfg.host, cfg.port, ssl_context=ssl_context, backlog=LISTEN_BACKLOG
        )
        await site.start()
        if cfg.plain_http:
            log.warning("leader.plain_http", listen=cfg.listen)
        _warn_if_others_read(cfg.api_token_file)
        log.info("leader.serving", listen=cfg.listen, tls=not cfg.plain_http)

    def _renewal(self) -> Callable[[], object] | None:
        """How the leader's own certificate is issued again when due; None for a
        certificate the operator provides (it is loaded again when its files change)."""
        cfg = self.leader_config
        if cfg.tls is not None:
            return None
        names = default_names(list(cfg.tls_names))
        tls_dir = self.config.state_path / "tls"
        return functools.partial(ensure_leader_tls, tls_dir, names, create_ca=False)

    async def wait_engine(self, stop: asyncio.Event, waiting: Callable[[str], None]) -> bool:
        """Whether the engine answered before `stop` was set (asked again while it does not)."""
        assert self.ctx is not None, "start() first"
        return await self.ctx.engine.wait_until_up(stop, waiting) is not None

    def stop_within(self) -> float:
        """The longest a stop may take: the drain, the grace an interrupted release has to
        undo itself, the HTTP server's shutdown (the links close within it), a margin."""
        return self.leader_config.drain_timeout + INTERRUPT_GRACE_S + CLOSE_AFTER_DRAIN_S

    def status_line(self) -> str:
        """One line for the service manager: where it serves and what it is doing."""
        if self.ctx is None or self.scheduler is None:
            return "leader starting"
        scheme = "http" if self.leader_config.plain_http else "https"
        return (
            f"leader serving {scheme}://{self.leader_config.listen}: "
            f"{self.scheduler.active} deployment(s) running, "
            f"{self.ctx.hub.connected_count} worker(s) connected"
        )

    async def stop(self) -> None:
        # Drain first, with the API and the worker links still up: a deployment that is
        # distributing needs its workers' answers, and its followers see it finish.
        if self.scheduler is not None:
            await self.scheduler.shutdown(self.leader_config.drain_timeout)
        if self.rollouts is not None:
            await self.rollouts.stop()  # where it is: the next start resumes it
        if self.ctx is not None:
            await self.ctx.hub.close_all()
        if self._runner is not None:
            await self._runner.cleanup()
        tasks = (self._scheduler_task, self._lag_task, self._webhook_task, self._trim_task)
        more = (self._password_task, self._seed_task, self._cert_task, self._history_task)
        for task in (*tasks, *more):
            await _cancelled(task)
        if self.ctx is not None:
            await self.ctx.hub.close()
            await self.ctx.engine.close()
            await self.ctx.store.close()
        if self._lock_file is not None:
            self._lock_file.close()
        log.info("leader.stopped")


async def _cancelled(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait for it; one that had failed is logged, and the
    stop goes on to close the store and release the state directory."""
    if task is None:
        return
    task.cancel()
    (outcome,) = await asyncio.gather(task, return_exceptions=True)
    if isinstance(outcome, Exception):
        log.error("leader.task_failed", task=task.get_name(), error=repr(outcome))


def tune_collector(young: int = GC_YOUNG_THRESHOLD) -> None:
    """Keep the cyclic collector off the fan-out path (call once the leader is up).

    What start-up made lives as long as the process: frozen, full collections skip it.
    A larger first generation lets a round's short-lived messages die before they are
    ever examined, so few reach the old generation and full collections stay rare.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young, older, oldest)


def _leader_tls(cfg: LeaderConfig, state: Path) -> LeaderTLS | None:
    """The configured certificate, or the leader's own CA made on first start."""
    if cfg.plain_http:
        return None
    if cfg.tls is not None:
        tls = LeaderTLS(Path(cfg.tls.ca_file), Path(cfg.tls.cert_file), Path(cfg.tls.key_file))
    else:
        tls = _own_tls(cfg, state / "tls")
    try:
        tls.server_context()
        tls.fingerprint()
    except OSError as exc:  # not there yet, say: a restart may find it (exit 1, restarted)
        raise AgentError(f"leader.tls: cannot read the certificate: {exc}") from None
    except (ssl.SSLError, ValueError) as exc:  # there, and wrong: a config error
        raise ConfigError(f"leader.tls: cannot load the certificate: {exc}") from None
    return tls


def _warn_if_others_read(token_file: str | None) -> None:
    """Anyone on the host who can read the API token can deploy: say so at start."""
    mode = others_may_read(token_file) if token_file else None
    if mode is not None:
        log.warning(
            "leader.api_token_readable",
            file=token_file,
            mode=mode,
            hint=f"every user of this host can read the API token: chmod 600 {token_file}",
        )


def _own_tls(cfg: LeaderConfig, directory: Path) -> LeaderTLS:
    """The leader's own CA and a server certificate for its names, made as needed."""
    try:
        return ensure_leader_tls(directory, default_names(list(cfg.tls_names)))
    except OSError as exc:
        raise AgentError(
            f"state_dir: cannot keep the leader's certificate in {directory}: {exc}"
        ) from None
    except ValueError as exc:  # a name no certificate can hold, a CA and key apart
        raise ConfigError(f"the leader's certificate in {directory}: {exc}") from None


def _pull_progress(journal: Journal) -> ProgressSink:
    async def record(node: str, progress: wire.PullProgress) -> None:
        if progress.order != wire.SYNC_ORDER:
            await journal.record(
                progress.order,
                "pull",
                node=node,
                layer=progress.layer,
                status=progress.status,
                current=progress.current,
                total=progress.total,
            )

    return record


def _lock_state_dir(state: Path) -> IO[str]:
    """One leader per state directory: a second one would run deployments twice."""
    lock = (state / "lock").open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        # Not a config error: the other one may be on its way out (exit 1, restarted).
        raise AgentError(f"state_dir: another deploy-agent holds {state}/lock") from None
    os.chmod(lock.name, 0o600)
    return lock
