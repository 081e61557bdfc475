"""A deployment's event journal: record to the store, wake followers, replay and follow.

The store is the only source of truth; followers read it from their cursor on, so a
reader that joins late replays everything and one that lags misses nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from agent.leader.state.models import Deployment
from agent.leader.state.store import Store

FOLLOW_IDLE_SECONDS = 15.0


class Journal:
    def __init__(self, store: Store, on_state: Callable[[], None] = lambda: None) -> None:
        self._store = store
        self._changed: dict[str, asyncio.Event] = {}
        self._on_state = on_state

    async def record(self, dep_id: str, event_type: str, **fields: Any) -> None:
        await self._store.append_event(dep_id, {"type": event_type, **fields})
        self._wake(dep_id)

    async def save(self, dep: Deployment, event_type: str | None = None, **fields: Any) -> None:
        """Persist `dep`, with an event in the same transaction when one is named."""
        event = None if event_type is None else {"type": event_type, **fields}
        await self._store.save(dep, event)
        self._wake(dep.id)
        if event_type == "state":
            self._on_state()

    def _wake(self, dep_id: str) -> None:
        changed = self._changed.pop(dep_id, None)
        if changed is not None:
            changed.set()

    async def follow(self, dep_id: str) -> AsyncIterator[bytes]:
        """Every event of `dep_id` from the first, then new ones until it is final.

        Yields b"" when nothing happened for a while, so the caller can keep the
        connection alive.
        """
        cursor = 0
        while True:
            changed = self._changed.setdefault(dep_id, asyncio.Event())
            dep = await self._store.get(dep_id)
            events = await self._store.events_after(dep_id, cursor)
            for doc in events:
                yield doc
            cursor += len(events)
            if events:
                continue
            if dep is None or dep.state.final:
                self._changed.pop(dep_id, None)  # nothing will change any more
                return
            try:
                async with asyncio.timeout(FOLLOW_IDLE_SECONDS):
                    await changed.wait()
            except TimeoutError:
                yield b""
