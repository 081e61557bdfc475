"""tenacity's retrying for one loop of attempts, taken apart when the loop is over.

An `AsyncRetrying` holds two reference cycles once it has run: it and its call state
point at each other, and its pending actions are bound methods of it. Only the cyclic
collector frees them, with whatever the retrying object reaches (its callbacks and what
they hold, a deployment, say), and the leader tunes the collector to make full passes
rare. Cut when the loop ends, all of it goes at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tenacity import AsyncRetrying


@contextlib.contextmanager
def scoped(attempts: AsyncRetrying) -> Iterator[AsyncRetrying]:
    """`attempts`, for `async for attempt in attempts` inside the block only."""
    try:
        yield attempts
    finally:
        attempts.iter_state.reset()  # its actions are bound methods of `attempts`
        attempts.__dict__.pop("_retry_state", None)  # it points back at `attempts`
