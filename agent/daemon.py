"""`deploy-agent run`: start the role the config names, run until SIGTERM, then stop.
SIGHUP is logged and ignored.

Signal handlers only set an event; the stop order lives with the role. The service
manager hears READY=1 once the role serves, WATCHDOG=1 from the event loop meanwhile,
and STOPPING=1 as soon as the stop event is set.
"""

from __future__ import annotations

import asyncio
import signal

from agent.config import Config
from agent.eventloop import loop_name
from agent.leader.server import Leader, tune_collector
from agent.logs import get_logger, redactor
from agent.systemd import Notifier
from agent.worker.agent import Worker

log = get_logger(__name__)


async def run(config: Config) -> None:
    redactor.add(*config.secrets())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP's default would end the agent at once, undrained, and systemd counts that as a
    # clean exit (no restart). A reload is not supported: say so and go on.
    loop.add_signal_handler(signal.SIGHUP, _hangup)
    notifier = Notifier.from_environ()
    notifier.status(f"{config.role} starting")
    try:
        if config.role == "worker":
            await _run_worker(Worker(config), stop, notifier)
        else:
            await _run_leader(Leader(config), stop, notifier)
    finally:
        notifier.close()


def _hangup() -> None:
    log.warning("agent.sighup_ignored", hint="restart the service to read a changed config")


async def _run_worker(worker: Worker, stop: asyncio.Event, notifier: Notifier) -> None:
    log.info("agent.started", role="worker", event_loop=loop_name())
    async with notifier.pulse(stop, worker.status_line):
        await worker.run(stop, notifier)


async def _run_leader(leader: Leader, stop: asyncio.Event, notifier: Notifier) -> None:
    async with notifier.pulse(stop, leader.status_line, leader.stop_within()):
        try:
            await leader.start()
            tune_collector()
            log.info("agent.started", role="leader", event_loop=loop_name())
            if await leader.wait_engine(stop, notifier.waiting_for_engine):
                notifier.ready(leader.status_line())
                log.info("agent.ready", role="leader")
            await stop.wait()
            log.info("agent.stopping")
        finally:
            await leader.stop()
