"""Carries out an upgrade order: fetch the release's wheels from the leader (each checked
against its sha256), install them beside the running release in a virtualenv of their
own, check that the new release starts, and make it current on trial.

Nothing the running release needs is touched until the new one is installed and has
answered `--version`: a download or an install that fails leaves the node as it was.
The restart into the new release is the caller's (the worker stops, exit 75).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import shutil
import sys
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from agent import wire
from agent.errors import AgentError
from agent.logs import get_logger
from agent.procs import communicate_within
from agent.worker.identity import Identity
from agent.worker.releases import Releases

log = get_logger(__name__)
LOCK_IN_WHEEL = "agent/requirements.txt"
DOWNLOAD_CONNECT_S = 15.0
DOWNLOAD_IDLE_S = 60.0  # a file that stops arriving for this long has failed
VENV_TIMEOUT_S = 120.0
INSTALL_TIMEOUT_S = 600.0
CHECK_TIMEOUT_S = 60.0
CHUNK = 256 * 1024
Report = Callable[[str, str | None], Awaitable[None]]


class UpgradeFailed(AgentError):
    """The new release could not be fetched, installed or started: the node is unchanged."""


class Upgrade:
    """One upgrade order on this node, from its first download to the switch."""

    def __init__(
        self,
        order: wire.UpgradeOrder,
        releases: Releases,
        leader_url: str,
        identity: Identity,
        report: Report,
    ) -> None:
        self.order = order
        self._releases = releases
        self._leader = leader_url
        self._identity = identity
        self._report = report

    async def run(self) -> None:
        """Fetch, install, check and switch; UpgradeFailed says what failed."""
        order = self.order
        staging = await asyncio.to_thread(self._releases.staging, order.upgrade)
        await self._report("downloading", f"{1 + len(order.dependencies)} file(s)")
        await self._fetch_all(staging)
        await self._report("installing", order.version)
        try:
            target = await asyncio.to_thread(self._releases.make_room, order.version)
        except ValueError as exc:
            raise UpgradeFailed(str(exc)) from None
        try:
            await self._install(staging, target / "venv")
        except BaseException:
            await asyncio.to_thread(_remove_tree, target)
            raise
        finally:
            await asyncio.to_thread(_remove_tree, staging)
        await asyncio.to_thread(self._releases.switch, order.version, order.upgrade)

    async def _fetch_all(self, staging: Path) -> None:
        base = f"{self._leader.rstrip('/')}/v1/upgrades/{self.order.upgrade}/files/"
        timeout = aiohttp.ClientTimeout(connect=DOWNLOAD_CONNECT_S, sock_read=DOWNLOAD_IDLE_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for file in (self.order.wheel, *self.order.dependencies):
                await self._fetch(session, base + file.name, file, staging / file.name)

    async def _fetch(
        self, session: aiohttp.ClientSession, url: str, file: wire.UpgradeFile, path: Path
    ) -> None:
        digest, size = hashlib.sha256(), 0
        try:
            async with session.get(
                url, headers=self._identity.auth_header(), ssl=self._identity.ssl_for(url)
            ) as response:
                if response.status != 200:
                    raise UpgradeFailed(f"the leader answered {response.status} for {file.name}")
                with path.open("wb") as out:
                    async for chunk in response.content.iter_chunked(CHUNK):
                        size += len(chunk)
                        if size > file.size:
                            raise UpgradeFailed(f"{file.name} is larger than announced")
                        digest.update(chunk)
                        await asyncio.to_thread(out.write, chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpgradeFailed(f"fetching {file.name}: {type(exc).__name__}: {exc}") from None
        if digest.hexdigest() != file.sha256:
            raise UpgradeFailed(
                f"{file.name} does not match its sha256 (got {digest.hexdigest()[:16]}…, "
                f"ordered {file.sha256[:16]}…): not installed"
            )

    async def _install(self, staging: Path, venv: Path) -> None:
        order = self.order
        wheel = staging / order.wheel.name
        requirements = staging / "requirements.txt"
        await asyncio.to_thread(_extract_lock, wheel, requirements)
        pip = await _virtualenv(venv)
        offline = ("--no-index", "--find-links", str(staging)) if order.dependencies else ()
        await _run(
            "dependencies",
            INSTALL_TIMEOUT_S,
            *pip,
            *offline,
            *("--require-hashes", "-r", str(requirements)),
        )
        await _run("wheel", INSTALL_TIMEOUT_S, *pip, "--no-index", "--no-deps", str(wheel))
        said = await _run("check", CHECK_TIMEOUT_S, str(venv / "bin" / "deploy-agent"), "--version")
        if said.strip() != f"deploy-agent {order.version}":
            raise UpgradeFailed(f"the new release says {said.strip()!r}, not {order.version}")


def _extract_lock(wheel: Path, out: Path) -> None:
    """The hashed requirements the release was tested with, from its own wheel."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            out.write_bytes(archive.read(LOCK_IN_WHEEL))
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise UpgradeFailed(f"{wheel.name} carries no {LOCK_IN_WHEEL}: {exc}") from None


def _base_python() -> str:
    """The interpreter the running release's virtualenv was made from."""
    return str(getattr(sys, "_base_executable", None) or sys.executable)


async def _virtualenv(venv: Path) -> tuple[str, ...]:
    """Make the new release's virtualenv; the pip command that installs into it. The
    running release's pip does, when it has one (`pip --python`): seeding a pip of its
    own into the new virtualenv takes longer than the install itself."""
    python = str(venv / "bin" / "python")
    quiet = ("install", "-q", "--no-input", "--disable-pip-version-check", "--no-compile")
    if importlib.util.find_spec("pip") is not None:
        await _run(
            "virtualenv", VENV_TIMEOUT_S, _base_python(), "-m", "venv", "--without-pip", str(venv)
        )
        return (sys.executable, "-m", "pip", "--python", python, *quiet)
    await _run("virtualenv", VENV_TIMEOUT_S, _base_python(), "-m", "venv", str(venv))
    return (python, "-m", "pip", *quiet)


async def _run(step: str, seconds: float, *argv: str) -> str:
    """Run one install step under its deadline; its stdout, or UpgradeFailed with the
    last lines it wrote."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await communicate_within(proc, seconds)
    except TimeoutError:
        raise UpgradeFailed(f"the {step} step did not finish within {seconds:.0f} s") from None
    if proc.returncode != 0:
        text = (err or out).decode(errors="replace").strip().splitlines()
        raise UpgradeFailed(f"the {step} step failed: {' | '.join(text[-5:]) or proc.returncode}")
    return out.decode(errors="replace")


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
