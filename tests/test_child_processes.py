"""Commands the agent runs under a deadline (a registry password command, git, pip):
the deadline holds, nothing they started is left running, and what they print on
failure is not logged."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from agent.leader.registry import password_command
from agent.leader.registry.password_command import PasswordCommandError, run_password_command


def _running(*argv: str) -> list[int]:
    """Processes whose command line is `argv` (arguments NUL-separated, as /proc has them)."""
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes() == wanted:
                found.append(int(proc.name))
        except OSError:
            continue  # gone meanwhile
    return found


async def test_a_command_past_its_deadline_is_killed_with_what_it_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The shell forks the command (`aws …` hung on the network, here a sleep): killing
    the shell alone left the command running, holding its pipes, and the deadline then
    waited for it too."""
    monkeypatch.setattr(password_command, "COMMAND_DEADLINE", 0.5)
    marker = f"{time.time_ns() % 10_000 + 40}.123"
    started = time.monotonic()

    with pytest.raises(PasswordCommandError, match="did not finish within"):
        async with asyncio.timeout(10):  # the deadline waited for the orphan's pipes
            await run_password_command(f"sleep {marker}; echo never")

    assert time.monotonic() - started < 3
    await asyncio.sleep(0.2)
    assert _running("sleep", marker) == []


async def test_a_failing_commands_messages_are_not_in_its_error() -> None:
    """Its stderr may hold the token it was about to print (a script under `set -x`):
    the error, which is logged, gives the exit status and says where to look."""
    with pytest.raises(PasswordCommandError) as caught:
        await run_password_command("echo '+ echo tok-S3CRET-0123' >&2; exit 3")
    assert "status 3" in caught.value.message
    assert "S3CRET" not in caught.value.message
