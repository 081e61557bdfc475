"""What of a build context reaches the engine: .dockerignore applied, the Dockerfile fit
for the engine's frontend.

BuildKit through the Engine API takes the context as an archive and, unlike the classic
builder, does not apply the archive's .dockerignore: the leader does, here, on every
context (the command line has already left ignored files out of its uploads; an API
client may not have). The Dockerfile named by the deployment stays whatever the patterns
say, as with Docker, which needs it to build.

Engines before 23.0 carry a Dockerfile frontend that refuses `COPY --link` (and `ADD
--link`); the flag changes how the layer is made, not the files it holds, so for those
engines it is taken out of the Dockerfile that the engine reads.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

from agent.dockerignore import FILENAME, DockerIgnore, IgnoreFileError
from agent.errors import DeploymentError

# COPY or ADD and the flags that follow it, before the first source
_INSTRUCTION = re.compile(r"^(\s*(?:COPY|ADD))((?:[ \t]+--\S+)*)", re.IGNORECASE | re.MULTILINE)
_LINK_FLAG = re.compile(r"[ \t]+--link(?:=(?:true|false))?(?=\s|$)", re.IGNORECASE)
_MAX_IGNORE_FILE = 1024 * 1024
_COMPRESSED = (b"\x1f\x8b\x08", b"BZh", b"\xfd7zXZ\x00")
_EXTENDED_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
_MAX_DOCKERFILE = 4 * 1024 * 1024


def without_link(dockerfile: str) -> str:
    """`dockerfile` with `--link` taken off its COPY and ADD instructions (flags come
    before the sources, on the instruction's own line)."""
    return _INSTRUCTION.sub(lambda m: m.group(1) + _LINK_FLAG.sub("", m.group(2)), dockerfile)


def adapt_archive(path: Path, dockerfile: str, *, drop_link: bool) -> bool:
    """Rewrite the context archive at `path` (uncompressed, in place) if its .dockerignore
    excludes anything in it, its Dockerfile must lose `--link`, or BuildKit would not
    know it for an archive; True if it did."""
    ignore, text = _read_controls(path, dockerfile)
    changed_dockerfile = without_link(text) if drop_link and text is not None else text
    excluded = _excluded_members(path, ignore, dockerfile)
    if not excluded and changed_dockerfile == text and _recognisable(path):
        return False
    temporary = path.with_name(path.name + ".adapting")
    try:
        _copy_archive(path, temporary, excluded, dockerfile, changed_dockerfile)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return True


def _read_controls(path: Path, dockerfile: str) -> tuple[DockerIgnore, str | None]:
    """The archive's .dockerignore and Dockerfile text."""
    ignore_text: str | None = None
    dockerfile_text: str | None = None
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            name = _name(member)
            if member.isfile() and name in (FILENAME, dockerfile):
                data = _read_member(archive, member, name)
                if name == FILENAME:
                    ignore_text = data
                else:
                    dockerfile_text = data
    try:
        return DockerIgnore(ignore_text or ""), dockerfile_text
    except IgnoreFileError as exc:
        raise DeploymentError(
            "build_failed",
            f"the build context's {exc.message}",
            hint="fix the pattern: .dockerignore uses Docker's rules, as `docker build` reads it",
        ) from None


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> str:
    limit = _MAX_IGNORE_FILE if name == FILENAME else _MAX_DOCKERFILE
    if member.size > limit:
        raise DeploymentError("build_failed", f"the build context's {name} is over {limit} bytes")
    handle = archive.extractfile(member)
    return handle.read().decode("utf-8", errors="replace") if handle else ""


def _excluded_members(path: Path, ignore: DockerIgnore, dockerfile: str) -> set[str]:
    if not ignore:
        return set()
    with tarfile.open(path, "r:*") as archive:
        return {
            name
            for name in map(_name, archive)
            if name not in (dockerfile, ".") and ignore.excluded(name)
        }


def _recognisable(path: Path) -> bool:
    """Whether BuildKit takes the file for an archive: it tells by the first kilobyte, in
    which a compressed stream shows its magic number, and a tar must hold a whole first
    header. An extended header first (PAX, as Python writes for every file whose time
    has a fraction, or GNU's for a long name) pushes it past that, and the context would
    be read as a Dockerfile."""
    with path.open("rb") as f:
        head = f.read(512)
    if head.startswith(_COMPRESSED):
        return True
    return len(head) == 512 and head[156:157] not in _EXTENDED_TYPES


def _copy_archive(
    source: Path, dest: Path, excluded: set[str], dockerfile: str, text: str | None
) -> None:
    with (
        tarfile.open(source, "r:*") as archive,
        tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as out,
    ):
        for member in archive:
            name = _name(member)
            if name in excluded:
                continue
            member.mtime = int(member.mtime)  # whole seconds need no extended header
            member.pax_headers = {}
            if name == dockerfile and member.isfile() and text is not None:
                data = text.encode()
                member.size = len(data)
                out.addfile(member, io.BytesIO(data))
            else:
                out.addfile(member, archive.extractfile(member) if member.isfile() else None)


def _name(member: tarfile.TarInfo) -> str:
    """A member's path as patterns see it: relative, without `./` or a trailing slash."""
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/") or "."
