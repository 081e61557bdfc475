"""Pull orders in flight: which nodes owe an answer, and the answers they gave.

One round per call to the hub's pull_everywhere. An answer, or a link dropping, settles
a node; the round's future resolves when no node owes an answer, so a round of a thousand
nodes wakes its waiter once, not once per node.

A node whose link dropped may still answer: its worker goes on pulling and reconnects
(a blip, a replaced connection) to send the order's answer on its new link, or,
restarted, pulls the image from the Sync it is sent. So a drop holds the node's place
for a grace period (a few seconds, within the round's own window) before it counts as
"disconnected", and an answer by either way, arriving while the round is open, takes
the drop's place: a failed pull then fails the distribution by name, instead of
leaving the node pending as if it were away.
"""

from __future__ import annotations

import asyncio

from agent import wire


class PullRound:
    def __init__(self, order: str, owed: set[str], image: str = "") -> None:
        self.order = order
        self.image = image
        self.ordered = frozenset(owed)
        self._owed = owed
        self.answers: dict[str, wire.PullResult | None] = {}  # None: the link dropped
        self._graces: dict[str, asyncio.TimerHandle] = {}
        self._loop = asyncio.get_running_loop()
        self.settled: asyncio.Future[None] = self._loop.create_future()
        self._check()

    def owes(self, node_id: str) -> bool:
        return node_id in self._owed

    def expects(self, node_id: str) -> bool:
        """Whether an answer of the node would count: it owes one, or its link dropped."""
        return node_id in self._owed or (node_id in self.answers and not self.answers[node_id])

    def dropped(self, node_id: str, grace: float) -> None:
        """The node's link is gone: after `grace` seconds with no answer, it owes none."""
        if node_id not in self._owed:
            return
        self.answers[node_id] = None
        if grace <= 0:
            self.settle(node_id, None)
        elif node_id not in self._graces:
            self._graces[node_id] = self._loop.call_later(grace, self.settle, node_id, None)

    def settle(self, node_id: str, answer: wire.PullResult | None) -> None:
        """Record a node's answer (None: its link dropped and its grace ran out). An
        answer after a drop replaces it; any other later answer is ignored."""
        if node_id in self._owed:
            self._owed.discard(node_id)
            self.answers[node_id] = answer
            if (grace := self._graces.pop(node_id, None)) is not None:
                grace.cancel()
            self._check()
        elif answer is not None and self.expects(node_id):
            self.answers[node_id] = answer

    def close(self) -> None:
        for grace in self._graces.values():
            grace.cancel()
        self._graces.clear()

    def _check(self) -> None:
        if not self._owed and not self.settled.done():
            self.settled.set_result(None)


class OrdersInFlight:
    """Every round not yet settled, by order id (rounds may share an order id)."""

    def __init__(self) -> None:
        self._rounds: dict[str, list[PullRound]] = {}

    def open(self, pull_round: PullRound) -> None:
        self._rounds.setdefault(pull_round.order, []).append(pull_round)

    def close(self, pull_round: PullRound) -> None:
        pull_round.close()
        rounds = self._rounds.get(pull_round.order, [])
        if pull_round in rounds:
            rounds.remove(pull_round)
        if not rounds:
            self._rounds.pop(pull_round.order, None)

    def owed(self, node_id: str, order: str) -> bool:
        """Whether the node's progress on `order` is wanted: a round expects its answer."""
        return any(r.expects(node_id) for r in self._rounds.get(order, ()))

    def answer(self, node_id: str, result: wire.PullResult) -> None:
        for pull_round in self._rounds.get(result.order, ()):
            pull_round.settle(node_id, result)
        if result.order == wire.SYNC_ORDER:  # a restarted node pulled it from its Sync
            for rounds in self._rounds.values():
                for pull_round in rounds:
                    if pull_round.image == result.image and node_id in pull_round.answers:
                        pull_round.settle(node_id, result)

    def drop(self, node_id: str, grace: float) -> None:
        """A node's link is gone: it owes nothing more to any round once `grace` seconds
        pass with no answer (0: at once)."""
        for rounds in self._rounds.values():
            for pull_round in rounds:
                pull_round.dropped(node_id, grace)
