"""Child processes the agent runs (git, pip, a password command): their output, read
under a deadline, and never an orphan left running when the caller gives up.

Start each one in a session of its own (`start_new_session=True`): a shell forks the
command it runs, and git its helpers, so killing the child alone would leave those
running, holding its pipes open (asyncio's loop then waits for them past the deadline).
The whole group is killed instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal


async def communicate_within(
    proc: asyncio.subprocess.Process, seconds: float | None
) -> tuple[bytes, bytes]:
    """`proc`'s stdout and stderr once it exits. On the deadline (TimeoutError) or a
    cancel, its process group is killed and reaped before the error goes on."""
    try:
        async with asyncio.timeout(seconds):
            out, err = await proc.communicate()
    except BaseException:
        _kill_group(proc)  # the child may be gone while what it started runs on
        await proc.wait()
        raise
    return out or b"", err or b""


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # it leads its own group: started in a session
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # not a group leader: the process alone
