"""Build contexts: an uploaded tar, or a git ref cloned shallow.

Both end as one tar file under the state directory, which the build stage reads once
agent/leader/pipeline/archive.py has checked it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tarfile
import tempfile
from collections.abc import Awaitable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from aiohttp import web

from agent.dockerignore import DockerIgnore, IgnoreFileError, whole_seconds
from agent.errors import DeploymentError, RequestError
from agent.leader.pipeline.archive import too_large
from agent.procs import communicate_within
from agent.urls import redact_url, without_userinfo

CHUNK = 1024 * 1024
# An upload never leaves less than this free on the state directory's filesystem: the
# store, its journal and the build must still have room once the context is in.
DISK_RESERVE_BYTES = 256 * 1024 * 1024
ROOM_CHECK_S = 0.5  # how often a clone under way looks at the room left
_ASKPASS = """#!/bin/sh
case "$1" in
  Username*) printf '%s\\n' "$DEPLOY_AGENT_GIT_USERNAME" ;;
  *) printf '%s\\n' "$DEPLOY_AGENT_GIT_PASSWORD" ;;
esac
"""


class GitCredentials:
    """The git URLs that carry credentials (`https://user:token@host/…`), in memory only,
    each until its deployment's clone takes it: the store keeps the URL without them,
    so no file of the leader's ever holds a git password."""

    def __init__(self) -> None:
        self._urls: dict[str, str] = {}

    def keep(self, dep_id: str, url: str) -> None:
        self._urls[dep_id] = url

    def take(self, dep_id: str) -> str | None:
        """The deployment's URL with its credentials, gone from here once taken."""
        return self._urls.pop(dep_id, None)

    def forget(self, dep_id: str) -> None:
        self._urls.pop(dep_id, None)


async def receive_upload(request: web.Request, dest: Path, limit: int) -> None:
    """Stream the request body to `dest`, refusing it past `limit` bytes (413) or when
    the filesystem would keep less than DISK_RESERVE_BYTES free (507)."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    _require_room(dest.parent, request.content_length or 0)
    received = 0
    loop = asyncio.get_running_loop()
    with dest.open("wb") as out:
        while chunk := await request.content.readany():
            received += len(chunk)
            if received > limit:
                raise too_large(limit)
            await loop.run_in_executor(None, _write_with_room, out, dest.parent, chunk)
    if received == 0:
        raise RequestError(400, "invalid_request", "the request body is empty: send a tar archive")


def _write_with_room(out: BinaryIO, directory: Path, chunk: bytes) -> None:
    """Write one chunk if the reserve stays free, on a thread: the check is a statvfs
    call, made before every write (a check every few MiB could let the last stretch
    undercut the reserve by as much)."""
    _require_room(directory, len(chunk))
    try:
        out.write(chunk)
    except OSError as exc:
        raise _no_room(directory, str(exc)) from None


def _require_room(directory: Path, coming: int) -> None:
    free = shutil.disk_usage(directory).free
    if free - coming < DISK_RESERVE_BYTES:
        raise _no_room(directory, f"{free // 2**20} MiB free, {coming // 2**20} MiB coming")


def _no_room(directory: Path, detail: str) -> RequestError:
    return RequestError(
        507,
        "insufficient_storage",
        f"no room for the build context in {directory} ({detail}; "
        f"{DISK_RESERVE_BYTES // 2**20} MiB must stay free)",
        hint="free space on the leader's state directory (old deployments' images, "
        "queued contexts), then submit again",
    )


def validate_git_url(url: str, allowed_schemes: tuple[str, ...]) -> None:
    if url != url.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise RequestError(
            400, "invalid_request", "git url holds control characters or surrounding spaces"
        )
    parts = urlsplit(url)
    if parts.query:  # it would be in git's argument list and its error messages
        raise RequestError(
            400,
            "invalid_request",
            "git url must not carry a query string",
            hint="give a token as the URL's user or password (https://TOKEN@host/owner/repo.git)",
        )
    if parts.scheme not in allowed_schemes or not (parts.netloc or parts.scheme == "file"):
        raise RequestError(
            400,
            "invalid_request",
            f"git url must use one of: {', '.join(allowed_schemes)}",
            hint="for example https://github.com/owner/repo.git",
        )


async def clone_to_context(
    url: str, ref: str, dest: Path, *, deadline: float, max_bytes: int, dockerfile: str
) -> str:
    """Clone `ref` of `url` shallow and pack it (without .git, and without what its
    .dockerignore excludes) into `dest`; return the commit. The clone stops once the
    filesystem would keep less than the reserve free, and the packing once the files pass
    `max_bytes`: a repository of any size must not fill the disk the store is on."""
    with tempfile.TemporaryDirectory(prefix="clone-", dir=dest.parent) as tmp:
        work = Path(tmp) / "src"
        try:
            async with asyncio.timeout(deadline):
                commit = await _until_no_room(dest.parent, _clone(url, ref, work, Path(tmp)))
        except TimeoutError:
            raise DeploymentError(
                "source_unavailable",
                f"cloning {redact_url(url)} took longer than {deadline:.0f} s",
                hint="check that the git host answers, or raise leader.git_timeout",
            ) from None
        await asyncio.to_thread(_pack_dir, work, dest, max_bytes, dockerfile)
    return commit.strip()


async def _clone(url: str, ref: str, work: Path, tmp: Path) -> str:
    env = _git_env(url, tmp)
    clean_url = without_userinfo(url)
    await _git(env, "init", "-q", str(work))
    await _git(env, "-C", str(work), "fetch", "-q", "--depth", "1", clean_url, ref)
    await _git(env, "-C", str(work), "checkout", "-q", "FETCH_HEAD")
    return await _git(env, "-C", str(work), "rev-parse", "HEAD")


async def _until_no_room(directory: Path, work: Awaitable[str]) -> str:
    """`work`'s result; cancelled (its git killed) if the reserve runs out meanwhile."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            free = shutil.disk_usage(directory).free
            if free < DISK_RESERVE_BYTES:
                task.cancel()
                raise DeploymentError(
                    "source_unavailable",
                    f"the clone was stopped with {free // 2**20} MiB left free in {directory} "
                    f"({DISK_RESERVE_BYTES // 2**20} MiB must stay free)",
                    hint="free space on the leader's state directory, or make the "
                    "repository smaller (its build context is limited to "
                    "leader.max_context_bytes anyway)",
                )
            await asyncio.wait([task], timeout=ROOM_CHECK_S)
        return task.result()
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _git_env(url: str, tmp: Path) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    parts = urlsplit(url)
    if parts.username or parts.password:
        askpass = tmp / "askpass"
        askpass.write_text(_ASKPASS)
        askpass.chmod(0o700)
        env |= {
            "GIT_ASKPASS": str(askpass),
            # userinfo is percent-encoded in a URL: git must get the token itself
            "DEPLOY_AGENT_GIT_USERNAME": unquote(parts.username or ""),
            "DEPLOY_AGENT_GIT_PASSWORD": unquote(parts.password or ""),
        }
    return env


async def _git(env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "git",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # killed as a group on its deadline
    )
    out, err = await communicate_within(proc, None)  # the stage's deadline bounds it
    if proc.returncode != 0:
        reason = err.decode(errors="replace").strip().splitlines()
        raise DeploymentError(
            "source_unavailable",
            f"git {_verb(args)} failed: " + (reason[-1] if reason else f"exit {proc.returncode}"),
            hint="check the url, the ref and the credentials of the git repository",
        )
    return out.decode()


def _verb(args: tuple[str, ...]) -> str:
    return next(a for a in args if a in ("init", "fetch", "checkout", "rev-parse"))


def _pack_dir(src: Path, dest: Path, max_bytes: int, dockerfile: str) -> None:
    packed = 0

    def counted(info: tarfile.TarInfo) -> tarfile.TarInfo:
        nonlocal packed
        packed += info.size
        if packed > max_bytes:
            raise DeploymentError(
                "source_unavailable",
                f"the repository's files pass the build context limit of {max_bytes} bytes",
                hint="leave build outputs out of the repository (or list them in its "
                ".dockerignore), or raise leader.max_context_bytes",
            )
        return whole_seconds(info)

    try:
        ignore = DockerIgnore.of_directory(src)
    except IgnoreFileError as exc:
        raise DeploymentError(
            "build_failed",
            f"the repository's {exc.message}",
            hint="fix the pattern: .dockerignore uses Docker's rules, as `docker build` reads it",
        ) from None
    with tarfile.open(dest, "w") as archive:
        for path in ignore.walk(src, keep=frozenset({dockerfile}), skip=frozenset({".git"})):
            archive.add(src / path, arcname=path, recursive=False, filter=counted)


def sweep_contexts(directory: Path, unfinished: set[str]) -> list[str]:
    """Remove what a stopped leader left in `directory`: uploads cut short, clones
    under way, the contexts of deployments since finished; keep the contexts of the
    deployments still to run. The names removed are returned."""
    removed = []
    for entry in sorted(directory.iterdir()):
        if entry.suffix == ".tar" and entry.stem in unfinished:
            continue
        remove_quietly(entry)
        removed.append(entry.name)
    return removed


def remove_quietly(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
