"""Keeps retention and builds on one engine apart: no image is removed while a build runs.

A build on an engine may use any image there: its parents, and every image the builder
looks at as a cache candidate (the classic builder reads each child of the step's parent
image in turn, BuildKit its own cache records), so no list of "images in use" can be
known from outside while a build runs. An image removed meanwhile fails it with "unable
to find image". So the leader never removes images on an engine while a build runs on
it, whichever builder that is:

- a build holds the gate shared: any number of builds run together;
- retention holds it exclusively: it waits until no build runs on that engine, and no
  build starts there until it is done; retentions that wait together run together;
- a retention that found no moment without builds within PRUNE_PATIENCE_S turns new
  builds away until it has run, so a steady stream of overlapping builds cannot put it
  off for good. A build then waits at most for one retention pass, and a retention at
  most for the builds under way.

The gate guards one engine: the leader holds one for the engine it builds on (its own,
or the build server's). Never hold it across anything but the build or the removals.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

# How long retention waits for a moment with no build on the engine before it holds new
# builds back: long enough for the usual gaps between short builds.
PRUNE_PATIENCE_S = 5.0


class BuildGate:
    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._building = 0
        self._pruning = 0
        self._prunes_waiting = 0

    @contextlib.asynccontextmanager
    async def build(self) -> AsyncIterator[None]:
        """Hold the gate for a build: after any retention under way, or kept waiting."""
        async with self._changed:
            await self._changed.wait_for(lambda: not self._pruning and not self._prunes_waiting)
            self._building += 1
        try:
            yield
        finally:
            self._building -= 1
            await self._wake()

    @contextlib.asynccontextmanager
    async def prune(self) -> AsyncIterator[None]:
        """Hold the gate for removing images: once no build runs on the engine."""
        async with self._changed:
            try:
                async with asyncio.timeout(PRUNE_PATIENCE_S):
                    await self._changed.wait_for(lambda: not self._building)
            except TimeoutError:
                self._prunes_waiting += 1  # from now on, new builds wait for this one
                try:
                    await self._changed.wait_for(lambda: not self._building)
                finally:
                    self._prunes_waiting -= 1
                    self._changed.notify_all()  # cancelled meanwhile: builds may go
            self._pruning += 1
        try:
            yield
        finally:
            self._pruning -= 1
            await self._wake()

    async def _wake(self) -> None:
        """Wake the waiters to look again, also when this holder is being cancelled."""
        await asyncio.shield(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
