""".dockerignore, read and matched with Docker's own rules.

The file is read as Docker's `ignorefile.ReadAll` reads it (a UTF-8 BOM dropped, `#` lines
skipped, each pattern trimmed, cleaned, a leading slash dropped); the matching is
moby/patternmatcher's, ported by e2b-dockerfile-utils: `*` and `?` stop at a slash, `**`
crosses any number of directories, a pattern that matches a directory excludes all below
it, and a later `!` pattern brings a path back. Used by the command line on the directory
it uploads and by the leader on git sources and uploaded archives.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from e2b_dockerfile_utils import PatternMatcher

FILENAME = ".dockerignore"
_BOM = "\ufeff"


class IgnoreFileError(Exception):
    """A .dockerignore that Docker would refuse too (an unterminated `[`, say)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DockerIgnore:
    """The patterns of one .dockerignore; `excluded(path)` for paths relative to the root."""

    def __init__(self, text: str = "") -> None:
        lines = text.removeprefix(_BOM).splitlines()
        try:
            self._matcher = PatternMatcher(lines)
        except ValueError as exc:
            raise IgnoreFileError(f"{FILENAME}: {exc}") from None
        self.patterns = self._matcher.patterns

    @classmethod
    def of_directory(cls, root: Path) -> DockerIgnore:
        path = root / FILENAME
        try:
            return cls(path.read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            return cls()

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def excluded(self, path: str) -> bool:
        return bool(self.patterns) and self._matcher.matches(path)

    def walk(
        self, root: Path, keep: frozenset[str] = frozenset(), skip: frozenset[str] = frozenset()
    ) -> Iterator[str]:
        """The paths under `root` (relative, `/`-separated, parents before children) that
        are not excluded, and the paths of `keep` whatever the patterns say; never those
        of `skip`, nor what lies below them. A directory that is excluded is not entered
        unless a `!` pattern could bring back something below it, so a large ignored tree
        costs nothing."""
        yield from self._walk(root, "", keep, skip)

    def _walk(
        self, root: Path, prefix: str, keep: frozenset[str], skip: frozenset[str]
    ) -> Iterator[str]:
        with os.scandir(root / prefix if prefix else root) as entries:
            children = sorted(entries, key=lambda entry: entry.name)
        for entry in children:
            path = f"{prefix}{entry.name}"
            if path in skip:
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            if self.excluded(path) and path not in keep:
                if is_dir and self._may_hold(path, keep):
                    yield from self._walk(root, f"{path}/", keep, skip)
                continue
            yield path
            if is_dir:
                yield from self._walk(root, f"{path}/", keep, skip)

    def _may_hold(self, directory: str, keep: frozenset[str]) -> bool:
        """Whether an excluded directory may still hold a path to send."""
        below = f"{directory}/"
        return self._matcher.may_match_under(directory) or any(p.startswith(below) for p in keep)


def whole_seconds(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """A context entry with its time in whole seconds (a `tarfile.add` filter): Python
    writes an extended (PAX) header before every entry whose time has a fraction, and
    BuildKit, which tells an archive by its first header, would then not see one."""
    info.mtime = int(info.mtime)
    return info
