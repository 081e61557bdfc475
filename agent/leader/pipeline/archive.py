"""The check a build context passes before the engine sees it.

An archive is refused when it cannot be read, is too large unpacked, or could reach
outside its root: absolute names, `..`, special files, and links whose target leaves
the context, directly or through other links of the archive.

The check reads the archive's own bytes, so it must not be the way to exhaust the
leader: the unpacked stream is read through a bound (its total size, the size of any
one header, the number of entries), and entries are not kept once looked at. A few
hundred kilobytes of gzip could otherwise claim a long name of gigabytes, or millions
of empty entries, each held in memory.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import posixpath
import tarfile
import zlib
from pathlib import Path
from typing import IO, cast

from agent.errors import RequestError

MAX_ENTRIES = 200_000
MAX_HEADER_READ = 1024 * 1024  # a long name or PAX header beyond this is no build context
HEADER_ALLOWANCE = 2048  # per entry, above the files' own sizes: headers and padding
LINK_DEPTH = 40  # as the kernel's limit on nested symbolic links
PATH_MAX = 4096  # as the kernel's: no path of a context is longer
_OPENERS = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))
_UNREADABLE = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError)


class _Refused(Exception):
    """Reading stopped at a bound: the error to answer with is attached."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(error.message)
        self.error = error


def check_context(path: Path, dockerfile: str, max_unpacked: int) -> None:
    """Refuse an archive that is corrupt, too large unpacked, or escapes its root."""
    try:
        with _unpacked(path) as raw:
            bounded = _Bounded(raw, max_unpacked)
            with tarfile.open(fileobj=cast(IO[bytes], bounded), mode="r:") as archive:
                names = _check_members(archive, bounded, max_unpacked)
    except _Refused as refused:
        raise refused.error from None
    except _UNREADABLE as exc:
        raise RequestError(
            400, "invalid_request", f"the build context is not a readable tar archive: {exc}"
        ) from None
    if posixpath.normpath(dockerfile) not in names:
        raise RequestError(
            400,
            "invalid_request",
            f"the build context has no {dockerfile}",
            hint="send the directory that holds the Dockerfile, or set dockerfile",
        )


def _unpacked(path: Path) -> IO[bytes]:
    """The archive's tar stream: decompressed as it is read, if it is compressed."""
    with path.open("rb") as probe:
        magic = probe.read(6)
    for prefix, opener in _OPENERS:
        if magic.startswith(prefix):
            return cast(IO[bytes], opener(path, "rb"))
    return path.open("rb")


class _Bounded:
    """The unpacked stream as tarfile reads it, refused once past what the archive may
    hold, or at a read too large for any header."""

    def __init__(self, raw: IO[bytes], max_unpacked: int) -> None:
        self._raw = raw
        self._max_unpacked = max_unpacked
        self.limit = max_unpacked + HEADER_ALLOWANCE

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > MAX_HEADER_READ:
            raise _Refused(_bad("holds a header larger than any build context needs"))
        data = self._raw.read(size)
        self._check()
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self._raw.seek(offset, whence)
        self._check()
        return position

    def tell(self) -> int:
        return self._raw.tell()

    def _check(self) -> None:
        if self._raw.tell() > self.limit:
            raise _Refused(too_large(self._max_unpacked))


def _check_members(archive: tarfile.TarFile, bounded: _Bounded, max_unpacked: int) -> set[str]:
    names: set[str] = set()
    links: dict[str, str] = {}
    total = entries = 0
    while (member := archive.next()) is not None:
        archive.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every entry
        entries += 1
        if entries > MAX_ENTRIES:
            raise _Refused(_bad(f"has more than {MAX_ENTRIES} entries"))
        bounded.limit += HEADER_ALLOWANCE
        name = _safe_name(member.name)
        total += max(member.size, 0)
        if total > max_unpacked:
            raise _Refused(too_large(max_unpacked))
        if member.issym():
            links[name] = _relative_target(member)
        elif member.islnk():
            _check_hard_link(member)
        elif not (member.isfile() or member.isdir()):
            raise _bad_member(member.name, "is a device, FIFO or other special file")
        names.add(name)
    if not names:
        raise RequestError(400, "invalid_request", "the build context archive is empty")
    _check_links(names, links)
    return names


def _check_links(names: set[str], links: dict[str, str]) -> None:
    """No entry lies under a link of the archive (unpacked, it would land wherever the
    link points: no build context needs that), and no link leads outside the context."""
    for name in names:
        parent = posixpath.dirname(name)
        while parent:
            if parent in links:
                raise _bad_member(name, f"lies under the link {parent!r}")
            parent = posixpath.dirname(parent)
    for name, target in links.items():
        if _resolve(name, links, _Budget()) is None:
            raise _bad_member(name, f"links outside the context ({target})")


def _safe_name(name: str) -> str:
    if len(name) > PATH_MAX:  # every check of it would cost with the square of its length
        raise _bad_member(name[:64] + "…", f"has a name over {PATH_MAX} bytes")
    if name.startswith("/") or "\\" in name:
        raise _bad_member(name, "has an absolute path")
    parts = name.split("/")
    if ".." in parts:
        raise _bad_member(name, "contains '..'")
    return posixpath.normpath(name)


def _relative_target(member: tarfile.TarInfo) -> str:
    if len(member.linkname) > PATH_MAX:
        raise _bad_member(member.name, f"links to a path over {PATH_MAX} bytes")
    if member.linkname.startswith("/"):
        raise _bad_member(member.name, f"links to an absolute path {member.linkname}")
    return member.linkname


def _check_hard_link(member: tarfile.TarInfo) -> None:
    """A hard link names another entry of the archive, from its root."""
    target = posixpath.normpath(_relative_target(member))
    if target == ".." or target.startswith("../"):
        raise _bad_member(member.name, f"links outside the context ({member.linkname})")


class _Budget:
    """Links one lookup may follow in all, as the kernel allows a path's resolution
    (chains of links that double at each level would otherwise take exponential time)."""

    def __init__(self) -> None:
        self.left = LINK_DEPTH

    def spend(self) -> bool:
        self.left -= 1
        return self.left >= 0


def _resolve(path: str, links: dict[str, str], budget: _Budget) -> list[str] | None:
    """Where `path` leads in the unpacked context, following the archive's symbolic
    links as the kernel would (a `..` after a link leaves the link's target, not its
    name); None if that is outside the context, or takes more links than a lookup may."""
    where: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not where:
                return None
            where.pop()
            continue
        where.append(part)
        target = links.get("/".join(where))
        if target is not None:
            if not budget.spend() or target.startswith("/"):
                return None
            base = "/".join(where[:-1])
            followed = _resolve(f"{base}/{target}" if base else target, links, budget)
            if followed is None:
                return None
            where = followed
    return where


def too_large(limit: int) -> RequestError:
    return RequestError(
        413,
        "invalid_request",
        f"the build context is larger than the limit of {limit} bytes",
        hint="leave build outputs out of the context, or raise leader.max_context_bytes",
    )


def _bad(why: str) -> RequestError:
    return RequestError(400, "invalid_request", f"the build context {why}")


def _bad_member(name: str, why: str) -> RequestError:
    return RequestError(400, "invalid_request", f"the build context entry {name!r} {why}")
