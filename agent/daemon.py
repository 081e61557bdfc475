"""`deploy-agent run`: start the role the config names, run until SIGTERM, then stop.

Signal handlers only set an event; the stop order lives with the role.
"""

from __future__ import annotations

import asyncio
import signal

from agent.config import Config
from agent.leader.server import Leader, register_secrets
from agent.logs import get_logger
from agent.worker.agent import Worker

log = get_logger(__name__)


async def run(config: Config) -> None:
    register_secrets(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.role == "worker":
        log.info("agent.started", role=config.role)
        await Worker(config).run(stop)
        return
    leader = Leader(config)
    try:
        await leader.start()
        log.info("agent.started", role=config.role)
        await stop.wait()
        log.info("agent.stopping")
    finally:
        await leader.stop()
