"""Where images are built and pushed: the leader's own engine, or a separate build
server whose Docker socket is forwarded over SSH to a socket in a 0700 directory.

A tunnel lives for one stage; an unreachable build server fails that deployment with
its reason and never the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import BuildServerConfig
from agent.engine import Builder, Engine, EngineFacts
from agent.errors import EngineError, SshError, SshRefused
from agent.leader.pipeline.build_gate import BuildGate
from agent.logs import get_logger
from agent.retention import prune_build_cache
from agent.ssh_target import SshTarget

if TYPE_CHECKING:
    from agent.ssh import SshHost

log = get_logger(__name__)
TUNNEL_PREFIX = "build-tunnel-"
TUNNEL_SOCKET = "docker.sock"
SOCKET_PATH_MAX = 108  # sun_path on Linux, with its terminating NUL


class BuildServerUnreachable(SshError):
    """The build server could not be reached or its Docker socket not forwarded."""


class BuildServerRefused(BuildServerUnreachable, SshRefused):
    """The build server refused the leader (its host key, the login) or cannot be named
    as configured: the next attempt would fail the same way."""


@dataclass(frozen=True, slots=True)
class BuilderChoice:
    """The builder an engine builds with, and why."""

    builder: Builder
    reason: str


def choose_builder(configured: Builder, facts: EngineFacts) -> BuilderChoice:
    if configured == "classic":
        return BuilderChoice("classic", 'leader.builder = "classic"')
    if not facts.buildkit:
        return BuilderChoice(
            "classic",
            f"the engine ({facts.os}, API {facts.api_version}) has no BuildKit: "
            "it needs Linux and API 1.39 (Engine 18.09) or later",
        )
    return BuilderChoice("buildkit", f"the engine (Docker {facts.version}) has BuildKit")


class Builders:
    """Hands out the engine that builds: the local one, or a tunnel to the build server.
    Remembers the builder that engine was last found to build with."""

    def __init__(
        self, local: Engine, config: BuildServerConfig | None, state_dir: Path, timeout: float
    ) -> None:
        self._local = local
        self._config = config
        self._state_dir = state_dir
        self._timeout = timeout
        self.last_choice: BuilderChoice | None = None
        self._builds = 0
        self._no_new_builds = asyncio.Lock()  # held by a build cache prune while it runs
        self._gate = BuildGate()  # no image removed on the building engine during a build

    @contextlib.asynccontextmanager
    async def building(self) -> AsyncIterator[None]:
        """Marks a build under way (one waits for a build cache prune to end first), and
        holds the building engine's gate: no image goes there meanwhile."""
        async with self._no_new_builds:
            self._builds += 1
        try:
            async with self._gate.build():
                yield
        finally:
            self._builds -= 1

    def pruning(self, *, local: bool) -> AbstractAsyncContextManager[None]:
        """Hold builds off an engine while images are removed there: the leader's own
        (`local`) or the build server's. One that does not build needs no holding."""
        return self._gate.prune() if local != self.remote else contextlib.nullcontext()

    async def prune_build_cache(self, keep_bytes: int) -> int | None:
        """Prune the build engine's build cache down to `keep_bytes`, if no build runs
        there now (builds that start meanwhile wait for it); None when one runs."""
        async with self._no_new_builds:
            if self._builds:
                return None
            async with self.engine() as engine:
                return await prune_build_cache(engine, keep_bytes)

    @property
    def remote(self) -> bool:
        return self._config is not None

    def describe(self) -> str:
        return self._config.ssh if self._config else "the leader's engine"

    @contextlib.asynccontextmanager
    async def engine(self) -> AsyncIterator[Engine]:
        if self._config is None:
            yield self._local
            return
        config = self._config
        # mkdtemp makes the directory 0700: only the agent can reach the tunnel socket
        directory = Path(tempfile.mkdtemp(prefix=TUNNEL_PREFIX, dir=tunnel_parent(self._state_dir)))
        socket = directory / TUNNEL_SOCKET
        try:
            async with (
                await _connect(config) as host,
                host.forward_socket(socket, config.docker_socket),
            ):
                engine = Engine(f"unix://{socket}", timeout=self._timeout)
                try:
                    await _probe(engine, config)
                    yield engine
                finally:
                    await engine.close()
        finally:
            shutil.rmtree(directory, ignore_errors=True)


async def _probe(engine: Engine, config: BuildServerConfig) -> None:
    """The tunnel's far end opens only per connection, and a refusal there (the socket
    missing, the SSH user not allowed to use it, forwarding disabled in sshd) just closes
    the connection: ask the engine once, so that reads as what it is."""
    try:
        await engine.version()
    except EngineError as exc:
        raise BuildServerUnreachable(
            f"the build server {config.ssh} does not serve its Docker socket "
            f"{config.docker_socket} over SSH ({exc.message}): is that the socket's path, may "
            "the SSH user use it (the docker group), and does its sshd allow stream-local "
            "forwarding?"
        ) from None


def tunnel_parent(state_dir: Path) -> Path:
    """Where tunnel directories go: the state directory, unless the socket's path would
    pass the kernel's limit for a Unix socket; then the system's temporary directory
    (private to the agent under its systemd unit)."""
    longest = f"{state_dir}/{TUNNEL_PREFIX}{'x' * 8}/{TUNNEL_SOCKET}"
    if len(os.fsencode(longest)) < SOCKET_PATH_MAX:
        return state_dir
    return Path(tempfile.gettempdir())


async def _connect(config: BuildServerConfig) -> SshHost:
    from agent.ssh import SshHost  # noqa: PLC0415 (the SSH library only for a build server)

    try:
        target = SshTarget.parse(config.ssh)
        identity = Path(config.identity_file) if config.identity_file else None
        return await SshHost.connect(
            target, known_hosts=Path(config.known_hosts), identity=identity
        )
    except (SshError, ValueError) as exc:
        message = exc.message if isinstance(exc, SshError) else str(exc)
        refused = not isinstance(exc, SshError) or isinstance(exc, SshRefused)
        kind = BuildServerRefused if refused else BuildServerUnreachable
        raise kind(f"the build server {config.ssh} is unreachable: {message}") from None
