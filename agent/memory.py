"""Hand freed heap memory back to the system, every so often.

A burst of uploads leaves glibc holding hundreds of MiB it has freed but not returned,
and so do large API responses and the TLS buffers of connections that have since
closed; `malloc_trim` returns it. A no-op where the C library has no such call.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim: Callable[[int], int] | None = getattr(ctypes.CDLL(name), "malloc_trim", None)
    return trim


def release_free_memory() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


async def release_free_memory_every(interval: float) -> None:
    """Trim the heap every `interval` seconds, on a thread: glibc holds the heap's lock
    while it walks its free lists (under a millisecond on a quiet heap)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        await loop.run_in_executor(None, release_free_memory)
