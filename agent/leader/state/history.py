"""Old deployments' history goes: their events and settled webhook deliveries.

Every build log line and every pull progress report is an event row, so the store grows
with each deployment, and with the number of workers. Once a day (and at start), the
events of deployments finished more than `leader.history_days` ago are deleted, with
their delivered or failed webhook deliveries; the deployment records stay, so
`GET /v1/deployments` and `GET /v1/deployments/{id}` still answer for them. SQLite
reuses the freed pages: the file stops growing rather than shrinking.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

from agent.leader.state.store import Store
from agent.logs import get_logger

log = get_logger(__name__)
PRUNE_INTERVAL_S = 24 * 3600.0
DAY_S = 24 * 3600.0


async def prune_history_every(
    store: Store, days: float, interval: float = PRUNE_INTERVAL_S
) -> None:
    """Prune now, then every `interval` seconds; `days` 0 keeps everything."""
    if days <= 0:
        return
    while True:
        try:
            deployments, events = await store.prune_history(time.time() - days * DAY_S)
        except sqlite3.Error as exc:  # tried again at the next round
            log.error("history.prune_failed", error=repr(exc))
        else:
            if deployments:
                log.info("history.pruned", deployments=deployments, events=events, days=days)
        await asyncio.sleep(interval)
