"""Registry credentials on the leader, and the mode (local or registry) they imply.

Credentials are verified against the registry through the engine before they are
stored; a rejected set leaves the previous one in force.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import msgspec

from agent.credentials import RegistryCredentials
from agent.engine import Engine
from agent.errors import RegistryAuthError, RegistryError, RequestError
from agent.leader.state.models import Mode
from agent.leader.state.store import Store
from agent.logs import get_logger, redactor

log = get_logger(__name__)


class ModeDecision(msgspec.Struct, frozen=True):
    mode: Mode
    reason: str
    enrolled_workers: int
    registry_configured: bool


CredentialsListener = Callable[[RegistryCredentials | None, int], None]


class RegistryService:
    def __init__(self, store: Store, engine: Engine, *, build_server: bool = False) -> None:
        self._store = store
        self._build_server = build_server
        self._engine = engine
        self._current: RegistryCredentials | None = None
        self.version = 0
        self._listeners: list[CredentialsListener] = []

    def on_change(self, listener: CredentialsListener) -> None:
        """Call `listener(credentials, version)` now and after every change."""
        self._listeners.append(listener)
        listener(self._current, self.version)

    def _changed(self, creds: RegistryCredentials | None, version: int) -> None:
        self._current, self.version = creds, version
        for listener in self._listeners:
            listener(creds, version)

    async def load(self) -> None:
        self._current = await self._store.credentials()
        self.version = await self._store.credentials_version()
        if self._current is not None:
            redactor.add(self._current.password)

    @property
    def current(self) -> RegistryCredentials | None:
        return self._current

    async def set(self, creds: RegistryCredentials) -> RegistryCredentials:
        """Verify `creds` against the registry, then store them as a new version."""
        redactor.add(creds.password)
        try:
            await self._engine.login(creds)
        except RegistryAuthError as exc:
            raise RequestError(
                422,
                "invalid_request",
                f"the registry refused these credentials: {exc.message}",
                hint="check the username and the token; the previous credentials stay in force",
            ) from None
        except RegistryError as exc:
            raise RequestError(
                422,
                "registry_unreachable",
                f"could not verify the credentials with {creds.server}: {exc.message}",
                hint="check the server address and that the registry answers",
            ) from None
        version = await self._store.put_credentials(creds)
        stored = dataclasses.replace(creds, version=version)
        self._changed(stored, version)
        log.info("registry.credentials_set", server=creds.server, version=version)
        return stored

    async def delete(self) -> bool:
        """Remove the credentials as a new version; with none set, change nothing (no
        new version for the workers to acknowledge). True if some were removed."""
        if self._current is None:
            return False
        version = await self._store.put_credentials(None)
        self._changed(None, version)
        log.info("registry.credentials_removed", version=version)
        return True

    async def decide_mode(self) -> ModeDecision:
        enrolled = await self._store.enrolled_count()
        configured = self._current is not None
        if configured:
            reason = "registry credentials are configured"
        elif enrolled:
            reason = f"{enrolled} worker(s) enrolled"
        elif self._build_server:
            reason = "images are built on a separate build server"
        else:
            reason = "no worker is enrolled and no registry is configured"
        remote = configured or enrolled or self._build_server
        mode = Mode.REGISTRY if remote else Mode.LOCAL
        return ModeDecision(mode, reason, enrolled, configured)


def registry_required(decision: ModeDecision) -> RequestError:
    return RequestError(
        409,
        "registry_required",
        f"images must go through a registry ({decision.reason}), and none is configured",
        hint="set credentials with `deploy-agent registry set` or PUT /v1/registry "
        "(server, username, password)",
    )
