"""The SSH layer against a real sshd on loopback (this machine plays the host): remote
commands end at their deadline on the host too, and a failed file write leaves no copy
of its content behind."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

import pytest

from agent.errors import HostKeyRejected, SshError, SshRefused
from agent.ssh import SshHost
from agent.ssh_target import SshTarget
from tests.support.sshd import Sshd, keygen


async def _host(sshd: Sshd) -> SshHost:
    return await SshHost.connect(
        SshTarget.parse(sshd.url), known_hosts=sshd.known_hosts, identity=sshd.identity
    )


def _running(pattern: str) -> bool:
    return (
        subprocess.run(["pgrep", "-f", pattern], capture_output=True, check=False).returncode == 0
    )


async def test_a_command_past_its_deadline_is_ended_on_the_host(sshd: Sshd) -> None:
    """Giving up on a command here also ends it there: it cannot race the next run."""
    seconds = f"3{uuid.uuid4().int % 1000}.5"  # an argument no other process has
    async with await _host(sshd) as host:
        with pytest.raises(SshError, match="the host ended it"):
            await host.run(f"sleep {seconds}; echo never", deadline=1, label="the nap")
        await asyncio.sleep(0.5)
        assert not _running(f"sleep {seconds}")
        done = await host.run("echo still usable", deadline=5)
    assert done.ok and done.stdout.strip() == "still usable"


async def test_a_failed_write_leaves_no_temporary_copy(sshd: Sshd, tmp_path: Path) -> None:
    """A write whose final rename fails (a directory is in the way) removes the
    temporary file that holds the content: it may be a secret."""
    target = tmp_path / "blocked"
    (target / "inside").mkdir(parents=True)
    async with await _host(sshd) as host:
        with pytest.raises(SshError, match="writing"):
            await host.write_file(str(target), b"secret\n", mode=0o600, deadline=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked"]


async def test_a_login_the_host_refuses_is_told_from_a_fault_that_passes(
    sshd: Sshd, tmp_path: Path
) -> None:
    """A key the host does not authorize, or a host key known_hosts does not hold, is
    SshRefused (what retries leave alone); a host that does not answer is not."""
    stranger = tmp_path / "stranger_ed25519"
    keygen(stranger)
    target = SshTarget.parse(sshd.url)
    with pytest.raises(SshRefused, match="refused the login"):
        await SshHost.connect(target, known_hosts=sshd.known_hosts, identity=stranger)
    with pytest.raises(HostKeyRejected):
        await SshHost.connect(
            target, known_hosts=sshd.impostor_known_hosts(), identity=sshd.identity
        )
    silent = SshTarget.parse("ssh://root@127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(SshError) as raised:
        await SshHost.connect(silent, known_hosts=sshd.known_hosts, identity=sshd.identity)
    assert not isinstance(raised.value, SshRefused)
