"""Inventory queries in flight: which of some images each asked worker's engine holds.

One round per call to the hub's `inventory`. A node settles its place by answering
(Holding) or by its link dropping; the round's future resolves when no node owes an
answer. A node with no answer when the round ends is unknown, never "holds none".
"""

from __future__ import annotations

import asyncio
import uuid

from agent import wire


class InventoryRound:
    def __init__(self, owed: set[str]) -> None:
        self.query = uuid.uuid4().hex
        self._owed = owed
        self.answers: dict[str, frozenset[str]] = {}
        self.settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._check()

    def settle(self, node_id: str, images: frozenset[str] | None) -> None:
        """Record a node's answer (None: its link dropped); later ones are ignored."""
        if node_id not in self._owed:
            return
        self._owed.discard(node_id)
        if images is not None:
            self.answers[node_id] = images
        self._check()

    def _check(self) -> None:
        if not self._owed and not self.settled.done():
            self.settled.set_result(None)


class InventoriesInFlight:
    """Every round not yet closed, by query id."""

    def __init__(self) -> None:
        self._rounds: dict[str, InventoryRound] = {}

    def open(self, owed: set[str]) -> InventoryRound:
        inventory_round = InventoryRound(owed)
        self._rounds[inventory_round.query] = inventory_round
        return inventory_round

    def close(self, inventory_round: InventoryRound) -> None:
        self._rounds.pop(inventory_round.query, None)

    def answer(self, node_id: str, holding: wire.Holding) -> None:
        inventory_round = self._rounds.get(holding.query)
        if inventory_round is not None:
            inventory_round.settle(node_id, frozenset(holding.images))

    def drop(self, node_id: str) -> None:
        """A node's link is gone: it owes no round an answer."""
        for inventory_round in self._rounds.values():
            inventory_round.settle(node_id, None)
