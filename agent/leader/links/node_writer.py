"""Writes what the links learn about nodes (last seen, versions, last pull) behind the hub,
and the catch-up pulls that settle a finished deployment's pending nodes.

Answers on the fan-out path only mark a node; its newest info reaches SQLite within
FLUSH_SECONDS, many nodes in one transaction. Readers of the node table flush first, so
the API never shows older info than the hub holds. It must never make a link wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

from agent.leader.state.models import CatchUp, NodeInfo, NodeRecord
from agent.leader.state.store import Store
from agent.logs import get_logger

log = get_logger(__name__)
FLUSH_SECONDS = 0.5


class NodeInfoWriter:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._dirty: dict[str, NodeInfo] = {}
        self._caught_up: list[CatchUp] = []
        self._timer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def mark(self, node: NodeRecord) -> None:
        """Note that `node.info` changed; it is written at the next flush."""
        self._dirty[node.id] = node.info
        self._flush_later()

    def caught_up(self, pull: CatchUp) -> None:
        """Note a pull from a Sync; deployments that left its node pending are updated at
        the next flush."""
        self._caught_up.append(pull)
        self._flush_later()

    def _flush_later(self) -> None:
        if self._timer is None:
            self._timer = asyncio.create_task(self._flush_soon(), name="node-info-flush")

    def pending(self, node_id: str) -> NodeInfo | None:
        """The info not yet written for `node_id`: newer than what the store holds."""
        return self._dirty.get(node_id)

    async def _flush_soon(self) -> None:
        try:
            await asyncio.sleep(FLUSH_SECONDS)
        finally:
            self._timer = None
        await self.flush()

    async def flush(self) -> None:
        """Write every marked node now, in one transaction, then the catch-ups noted."""
        async with self._lock:
            dirty, self._dirty = self._dirty, {}
            caught_up, self._caught_up = self._caught_up, []
            if dirty:
                try:
                    await self._store.save_node_infos(dirty)
                except sqlite3.Error as exc:
                    log.error("node_info.save_failed", nodes=len(dirty), error=repr(exc))
                    self._dirty = dirty | self._dirty  # keep them for the next flush
            await self._record(caught_up)

    async def _record(self, caught_up: list[CatchUp]) -> None:
        try:
            updated = await self._store.record_catch_ups(caught_up)
        except sqlite3.Error as exc:
            log.error("node_info.catch_up_failed", pulls=len(caught_up), error=repr(exc))
            self._caught_up = caught_up + self._caught_up
            return
        if updated:
            log.info("deployment.nodes_caught_up", deployments=updated, pulls=len(caught_up))

    async def close(self) -> None:
        """Stop the timer and write what is left; the store must still be open."""
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        await self.flush()
