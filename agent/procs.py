"""Child processes the agent runs (git, pip, a password command): their output, read
under a deadline, and never an orphan left running when the caller gives up."""

from __future__ import annotations

import asyncio
import contextlib


async def communicate_within(
    proc: asyncio.subprocess.Process, seconds: float | None
) -> tuple[bytes, bytes]:
    """`proc`'s stdout and stderr once it exits. On the deadline (TimeoutError) or a
    cancel, the process is killed and reaped before the error goes on."""
    try:
        async with asyncio.timeout(seconds):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return out or b"", err or b""
