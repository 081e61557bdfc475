"""Files the agent writes that must never be seen half written, and who may read those
it is given."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (a crash leaves the old file or the
    new one), readable by its owner only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def others_may_read(path: str | Path) -> str | None:
    """The file's mode ("0644") when users other than its owner and group may read it,
    else None (a file that cannot be looked at is nobody's to read here)."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    return f"{stat.S_IMODE(mode):04o}" if mode & stat.S_IROTH else None
