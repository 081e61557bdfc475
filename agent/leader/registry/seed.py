"""The registry credentials of the config file, set at start as `PUT /v1/registry` sets
them: verified against the registry through the engine, stored, sent to the workers.

An engine that is not up yet cannot verify them (Docker started after the agent, say),
nor a registry that does not answer (the network not up yet): they are tried again with
backoff until both answer, unless credentials were set through the API meanwhile,
which are newer. Credentials the registry refuses are not tried again.
"""

from __future__ import annotations

import asyncio
import dataclasses

from agent.backoff import Backoff
from agent.config import RegistryConfig
from agent.credentials import RegistryCredentials
from agent.errors import EngineError, RequestError
from agent.leader.registry.credentials import RegistryService
from agent.logs import get_logger

log = get_logger(__name__)
RETRY_FIRST = 1.0
RETRY_CAP = 30.0


async def seed_registry(seed: RegistryConfig, reg: RegistryService) -> bool:
    """Set the config's credentials unless they are in force already; False when they
    could not be checked and are worth trying again."""
    assert seed.password is not None, "a password_command is the refresher's"
    creds = RegistryCredentials(seed.server, seed.username, seed.password, seed.namespace)
    current = reg.current
    if current is not None and dataclasses.replace(current, version=0) == creds:
        return True
    try:
        await reg.set(creds)
    except RequestError as exc:
        if exc.code == "registry_unreachable":  # it did not answer: it may yet
            log.warning("registry.config_not_set", server=seed.server, error=exc.message)
            return False
        log.error("registry.config_rejected", server=seed.server, error=exc.message)
    except EngineError as exc:  # the engine is not up yet
        log.warning("registry.config_not_set", server=seed.server, error=exc.message)
        return False
    return True


async def seed_until_set(seed: RegistryConfig, reg: RegistryService) -> None:
    """Try the config's credentials again, with backoff, until they are set or refused,
    or credentials are set through the API."""
    backoff = Backoff(initial=RETRY_FIRST, cap=RETRY_CAP)
    before = reg.current
    while True:
        delay = backoff.next()
        log.info("registry.config_retry", server=seed.server, in_s=round(delay, 1))
        await asyncio.sleep(delay)
        if reg.current is not before:
            log.info("registry.config_superseded", server=seed.server)
            return
        if await seed_registry(seed, reg):
            return
