"""Capped exponential backoff with jitter, for reconnect loops that must never spin."""

from __future__ import annotations

import random


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
        ceiling = min(cap or self.cap, self.cap, self.initial * 2.0**self.attempt)
        self.attempt += 1
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 (jitter, not crypto)

    def reset(self) -> None:
        self.attempt = 0
