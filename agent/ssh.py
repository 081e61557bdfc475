"""SSH to a host through asyncssh, the only module that imports it. The host key is
always checked against known_hosts, never skipped; every connect, command and transfer
has a deadline, and a failure is an `SshError` that says what failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import secrets
import shlex
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography.utils import CryptographyDeprecationWarning

from agent.errors import HostKeyRejected, SshError, SshRefused
from agent.ssh_target import SshTarget

with warnings.catch_warnings():
    # asyncssh (2.24 and earlier) names cryptography's DSA key types at import, and
    # cryptography 51 deprecates DSA with a warning on each such name: asyncssh's own
    # doing, not ours, and nothing here uses DSA. Only that warning, only from asyncssh.
    warnings.filterwarnings(
        "ignore", category=CryptographyDeprecationWarning, module=r"asyncssh(\.|$)"
    )
    import asyncssh

CONNECT_TIMEOUT = 20.0
# asyncssh logs every channel, command and file at INFO: a bootstrap reports its own steps.
logging.getLogger("asyncssh").setLevel(logging.WARNING)
COMMAND_TIMEOUT = 60.0
KEEPALIVE_SECONDS = 15.0
CLOSE_TIMEOUT = 5.0
KILL_AFTER = 5.0  # a remote command that ignores SIGTERM at its deadline gets SIGKILL then
_TIMED_OUT = frozenset({124})  # what `timeout` exits with when the deadline passed


@dataclass(frozen=True, slots=True)
class Completed:
    command: str
    status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.status == 0

    def reason(self) -> str:
        """The last lines the command wrote on stderr (or stdout), for an error message."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return " | ".join(text[-5:]) or f"exit status {self.status}"


class SshHost:
    """One SSH connection: run commands, upload files, write small files with a mode."""

    def __init__(self, target: SshTarget, conn: asyncssh.SSHClientConnection) -> None:
        self.target = target
        self._conn = conn

    @classmethod
    async def connect(
        cls,
        target: SshTarget,
        *,
        known_hosts: Path,
        identity: Path | None = None,
        deadline: float = CONNECT_TIMEOUT,
    ) -> SshHost:
        try:
            async with asyncio.timeout(deadline):
                conn = await asyncssh.connect(
                    target.host,
                    target.port,
                    username=target.user,
                    known_hosts=str(known_hosts),
                    client_keys=[str(identity)] if identity is not None else (),
                    agent_path=None if identity is not None else (),
                    # a host that went silent (rebooted hard, packets dropped) is found
                    # within a minute, not after TCP's retransmissions (about 15 min)
                    keepalive_interval=KEEPALIVE_SECONDS,
                    keepalive_count_max=3,
                )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise HostKeyRejected(
                f"{target}: the host key is not trusted ({exc.reason}); known_hosts is "
                f"{known_hosts}. If the host was reinstalled, check its new key and update "
                "that file"
            ) from None
        except asyncssh.PermissionDenied as exc:
            raise SshRefused(
                f"{target}: the host refused the login ({exc.reason}): check the user and "
                "that the host authorizes the key"
            ) from None
        except TimeoutError:
            raise SshError(f"{target}: no SSH connection within {deadline:.0f} s") from None
        except (asyncssh.Error, OSError) as exc:
            raise SshError(f"{target}: cannot connect: {_describe(exc)}") from None
        return cls(target, conn)

    async def __aenter__(self) -> SshHost:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._conn.close()
        await self._conn.wait_closed()

    @contextlib.asynccontextmanager
    async def forward_socket(self, local: Path, remote: str) -> AsyncIterator[None]:
        """Serve `local` (a unix socket) as a tunnel to the host's `remote` socket."""
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                listener = await self._conn.forward_local_path(str(local), remote)
        except TimeoutError:
            raise SshError(
                f"forwarding {remote} did not start within {COMMAND_TIMEOUT:.0f} s"
            ) from None
        except (asyncssh.Error, OSError) as exc:
            raise SshError(f"forwarding {local} to the host's {remote}: {_describe(exc)}") from None
        try:
            yield
        finally:
            listener.close()
            # a tunnel connection over a dead channel would hold this for minutes
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await listener.wait_closed()

    async def run(
        self, command: str, *, deadline: float = COMMAND_TIMEOUT, label: str | None = None
    ) -> Completed:
        """Run `command` through the remote shell; a non-zero status is returned, not raised.

        The host ends the command itself at `deadline` (coreutils' `timeout`, which signals
        its whole process group): a command this side gave up on must not go on running
        there, racing the next run. `label` names the command in errors.
        """
        what = label or _first_word(command)
        seconds = max(1, round(deadline))
        bounded = f"timeout -k {KILL_AFTER:.0f} {seconds} sh -c {shlex.quote(command)}"
        try:
            async with asyncio.timeout(seconds + KILL_AFTER + CLOSE_TIMEOUT):
                done = await self._conn.run(bounded, check=False)
        except TimeoutError:
            raise SshError(f"{what} did not finish within {seconds} s") from None
        except (asyncssh.Error, OSError) as exc:
            raise SshError(f"{what}: {_describe(exc)}") from None
        if done.exit_status in _TIMED_OUT:
            raise SshError(f"{what} did not finish within {seconds} s; the host ended it")
        return Completed(
            command,
            done.exit_status if done.exit_status is not None else -1,
            _text(done.stdout),
            _text(done.stderr),
        )

    async def upload(self, local: list[Path], directory: str, *, deadline: float) -> None:
        """Copy `local` files into the remote `directory`, which is made if missing."""
        try:
            async with asyncio.timeout(deadline), self._conn.start_sftp_client() as sftp:
                await sftp.makedirs(directory, exist_ok=True)
                await sftp.put([str(path) for path in local], directory)
        except TimeoutError:
            raise SshError(
                f"upload to {directory} did not finish within {deadline:.0f} s"
            ) from None
        except (asyncssh.Error, OSError) as exc:
            raise SshError(f"upload to {directory}: {_describe(exc)}") from None

    async def write_file(self, path: str, data: bytes, *, mode: int, deadline: float) -> None:
        """Write `path` whole with `mode`: a new file is filled, then renamed over the old,
        so the content is never readable with a wider mode, even for a moment."""
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        attrs = asyncssh.SFTPAttrs(permissions=mode)
        try:
            async with asyncio.timeout(deadline), self._conn.start_sftp_client() as sftp:
                await sftp.makedirs(posixpath.dirname(path), exist_ok=True)
                try:
                    async with sftp.open(tmp, "wb", attrs) as f:
                        await f.write(data)
                    await sftp.chmod(tmp, mode)  # the umask may have narrowed it, or it existed
                    await sftp.posix_rename(tmp, path)
                except BaseException:
                    await _remove_quietly(sftp, tmp)  # it may hold a secret
                    raise
        except TimeoutError:
            raise SshError(f"writing {path} did not finish within {deadline:.0f} s") from None
        except (asyncssh.Error, OSError) as exc:
            raise SshError(f"writing {path}: {_describe(exc)}") from None


async def _remove_quietly(sftp: asyncssh.SFTPClient, path: str) -> None:
    with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await sftp.remove(path)


def _describe(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else (str(exc) or type(exc).__name__)


def _first_word(command: str) -> str:
    return f"`{command.split(maxsplit=1)[0]}`" if command.strip() else "the command"


def _text(output: str | bytes | None) -> str:
    if output is None:
        return ""
    return output.decode(errors="replace") if isinstance(output, bytes) else output
