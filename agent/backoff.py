"""Capped exponential backoff with jitter, for reconnect loops that must never spin."""

from __future__ import annotations

import random

# Doubling past this many steps changes nothing below any sane cap, and 2.0**1024 overflows.
_MAX_DOUBLINGS = 32


class Backoff:
    """Delays of `initial`, doubling to `cap`, each drawn from its upper half at random.

    Half the delay is fixed, so no draw is near zero: a reconnect loop never spins.
    """

    def __init__(self, initial: float = 0.5, cap: float = 30.0) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0

    def next(self, cap: float | None = None) -> float:
        """The next delay; `cap` lowers the ceiling for this draw only."""
        doublings = min(self.attempt, _MAX_DOUBLINGS)
        ceiling = min(cap or self.cap, self.cap, self.initial * 2.0**doublings)
        self.attempt += 1
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 (jitter, not crypto)

    def to_cap(self) -> None:
        """Make the next delays drawn at the cap: the peer said trying soon is futile."""
        self.attempt = max(self.attempt, _MAX_DOUBLINGS)

    def reset(self) -> None:
        self.attempt = 0
