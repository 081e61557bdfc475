"""Thins out the engine's per-layer progress: a change of status always passes, a repeat
of the same status at most once per interval."""

from __future__ import annotations

import time


class LayerThrottle:
    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._last: dict[str, tuple[str, float]] = {}

    def due(self, layer: str, status: str) -> bool:
        now = time.monotonic()
        last_status, at = self._last.get(layer, ("", float("-inf")))
        if last_status == status and now - at < self._interval:
            return False
        self._last[layer] = (status, now)
        return True
