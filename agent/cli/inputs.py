"""Files the command line reads for its flags. A file that cannot be used is named with
its flag, not taken for an unreachable leader or shown as a traceback."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """A file a flag names cannot be used; the message names the flag and the file."""


def read_text(flag: str, path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise InputError(f"{flag} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"{flag} {path}: not a text file") from None


def first_line(flag: str, path: str | Path) -> str:
    """The file's first line, stripped: a token or password written with `echo`."""
    lines = read_text(flag, path).strip().splitlines()
    if not lines:
        raise InputError(f"{flag} {path}: the file is empty")
    return lines[0].strip()
