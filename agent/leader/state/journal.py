"""A deployment's event journal: record to the store, wake followers, replay and follow.

The store is the only source of truth; followers read it from their cursor on, so a
reader that joins late replays everything and one that lags misses nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
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
        self.wake(dep_id)

    async def save(self, dep: Deployment, event_type: str | None = None, **fields: Any) -> None:
        """Persist `dep`, with an event in the same transaction when one is named."""
        event = None if event_type is None else {"type": event_type, **fields}
        await self._store.save(dep, event)
        self.wake(dep.id)
        if event_type == "state":
            self._on_state()

    async def _deployment_ended(self, dep_id: str) -> bool:
        dep = await self._store.get(dep_id)
        return dep is None or dep.state.final

    def wake(self, dep_id: str) -> None:
        """Wake the followers of `dep_id` (a deployment's, or a rollout's, events)."""
        changed = self._changed.pop(dep_id, None)
        if changed is not None:
            changed.set()

    async def follow(
        self, dep_id: str, ended: Callable[[str], Awaitable[bool]] | None = None
    ) -> AsyncIterator[bytes]:
        """Every event of `dep_id` from the first, then new ones until it has `ended`
        (by default: the deployment of that id is final, or there is none).

        Yields b"" when nothing happened for a while, so the caller can keep the
        connection alive.
        """
        has_ended = ended or self._deployment_ended
        cursor = 0
        while True:
            changed = self._changed.setdefault(dep_id, asyncio.Event())
            done = await has_ended(dep_id)
            events = await self._store.events_after(dep_id, cursor)
            for doc in events:
                yield doc
            cursor += len(events)
            if events:
                continue
            if done:
                self._changed.pop(dep_id, None)  # nothing will change any more
                return
            try:
                async with asyncio.timeout(FOLLOW_IDLE_SECONDS):
                    await changed.wait()
            except TimeoutError:
                yield b""
