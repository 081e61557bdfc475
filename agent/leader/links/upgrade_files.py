"""The files of a rollout: the agent's wheel and its dependencies' wheels, unpacked from
the tar the operator uploads, each named safely, hashed, and served to the workers.

Blocking: callers run `unpack` off the event loop.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from agent.errors import RequestError
from agent.wire import UpgradeFile

WHEEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}\.whl$")
AGENT_WHEEL = re.compile(r"^deploy_agent-(?P<version>[0-9][A-Za-z0-9.+!]{0,63})-py3-none-any\.whl$")
LOCK_IN_WHEEL = "agent/requirements.txt"
MAX_FILES = 500
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Release:
    version: str
    wheel: UpgradeFile
    dependencies: list[UpgradeFile]


def unpack(archive: Path, directory: Path) -> Release:
    """The release in `archive` (a tar of wheels), unpacked into `directory`; a 400 that
    says what is wrong with it otherwise (the directory is then removed)."""
    directory.mkdir(mode=0o700)
    try:
        files = _extract(archive, directory)
        return _release(files, directory)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _bad(message: str) -> RequestError:
    return RequestError(400, "invalid_request", f"the upgrade's files: {message}")


def _extract(archive: Path, directory: Path) -> list[UpgradeFile]:
    files: list[UpgradeFile] = []
    try:
        # uncompressed only (wheels are compressed already): no archive can unpack into
        # more than the upload limit it came in under
        with tarfile.open(archive, mode="r:") as tar:
            for member in tar:
                if member.isdir():
                    continue
                files.append(_extract_one(tar, member, directory))
                if len(files) > MAX_FILES:
                    raise _bad(f"more than {MAX_FILES} files")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise _bad(f"not a tar archive of wheels ({exc})") from None
    return files


def _extract_one(tar: tarfile.TarFile, member: tarfile.TarInfo, directory: Path) -> UpgradeFile:
    name = member.name.removeprefix("./")
    if not member.isfile() or not WHEEL_NAME.match(name):
        raise _bad(f"{name[:80]!r} is not a wheel at the archive's top level")
    target = directory / name
    if target.exists():
        raise _bad(f"{name} is there twice")
    source = tar.extractfile(member)
    assert source is not None  # a regular file
    digest = hashlib.sha256()
    with target.open("wb") as out:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return UpgradeFile(name=name, sha256=digest.hexdigest(), size=member.size)


def _release(files: list[UpgradeFile], directory: Path) -> Release:
    agents = [f for f in files if AGENT_WHEEL.match(f.name)]
    if len(agents) != 1:
        found = ", ".join(f.name for f in agents) or "none"
        raise _bad(f"exactly one deploy_agent-VERSION-py3-none-any.whl is needed (found {found})")
    (wheel,) = agents
    try:
        with zipfile.ZipFile(directory / wheel.name) as agent:
            agent.getinfo(LOCK_IN_WHEEL)
    except (zipfile.BadZipFile, KeyError, OSError):
        raise _bad(
            f"{wheel.name} carries no {LOCK_IN_WHEEL}: it is not a release that can "
            "upgrade workers (0.2.0 or newer, built with `uv build`)"
        ) from None
    match = AGENT_WHEEL.match(wheel.name)
    assert match is not None
    dependencies = [f for f in files if f is not wheel]
    return Release(match.group("version"), wheel, dependencies)
