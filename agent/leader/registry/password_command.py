"""Registry passwords from a command, for short-lived tokens (ECR's last 12 hours).

The command runs at start and again every `registry.password_refresh_s`; each new
password is set as `PUT /v1/registry` sets one: verified against the registry, stored
as a new version and sent to every worker. A failure keeps the credentials in force and
tries again sooner. The command's output is never logged.
"""

from __future__ import annotations

import asyncio
import dataclasses

from agent.backoff import Backoff
from agent.config import RegistryConfig
from agent.credentials import RegistryCredentials
from agent.errors import AgentError
from agent.leader.registry.credentials import RegistryService
from agent.logs import get_logger, redactor
from agent.procs import communicate_within

log = get_logger(__name__)
COMMAND_DEADLINE = 60.0
RETRY_FIRST = 30.0
RETRY_CAP = 600.0


class PasswordCommandError(AgentError):
    """The command failed, timed out or printed nothing."""


async def run_password_command(command: str) -> str:
    """The first line the shell command prints, stripped."""
    proc = await asyncio.create_subprocess_shell(
        command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # killed as a group on its deadline
    )
    try:
        out, err = await communicate_within(proc, COMMAND_DEADLINE)
    except TimeoutError:
        raise PasswordCommandError(
            f"registry.password_command did not finish within {COMMAND_DEADLINE:.0f} s"
        ) from None
    if proc.returncode != 0:  # its messages may hold a token (`set -x`, say): not logged
        said = len(err.decode(errors="replace").strip().splitlines())
        raise PasswordCommandError(
            f"registry.password_command exited with status {proc.returncode} ({said} lines "
            "on stderr, not logged: run the command as the service's user to read them)"
        )
    lines = out.decode(errors="replace").strip().splitlines()
    if not lines or not lines[0].strip():
        raise PasswordCommandError("registry.password_command printed no password")
    return lines[0].strip()


class PasswordRefresher:
    """Owns the refresh loop: one command run at a time, for the leader's lifetime."""

    def __init__(self, seed: RegistryConfig, registry: RegistryService) -> None:
        assert seed.password_command is not None
        self._seed = seed
        self._command = seed.password_command
        self._registry = registry

    async def run(self) -> None:
        refresh_s = self._seed.password_refresh_s
        backoff = Backoff(initial=min(RETRY_FIRST, refresh_s), cap=min(RETRY_CAP, refresh_s))
        while True:
            try:
                await self.refresh()
            except (AgentError, OSError) as exc:  # a refused token, a command or engine failure
                delay = backoff.next()
                error = exc.message if isinstance(exc, AgentError) else f"cannot run it: {exc}"
                log.error("registry.password_command_failed", error=error, retry_in_s=round(delay))
            else:
                backoff.reset()
                delay = self._seed.password_refresh_s
            await asyncio.sleep(delay)

    async def refresh(self) -> None:
        """Run the command once; set its password unless it is the one in force."""
        password = await run_password_command(self._command)
        redactor.add(password)
        seed = self._seed
        creds = RegistryCredentials(seed.server, seed.username, password, seed.namespace)
        current = self._registry.current
        if current is not None and dataclasses.replace(current, version=0) == creds:
            return
        stored = await self._registry.set(creds)
        log.info("registry.password_refreshed", server=seed.server, version=stored.version)
