"""What the leader's store files hold, read as an attacker with the disk would."""

from __future__ import annotations

import subprocess
from pathlib import Path

SUFFIXES = ("", "-wal", "-shm", "-journal")


def files_holding(db: Path, secret: str) -> list[str]:
    """The store's files (the database, its WAL…) in which `grep -a` finds `secret`."""
    files = [str(path) for suffix in SUFFIXES if (path := Path(f"{db}{suffix}")).exists()]
    assert files, f"no store files at {db}"
    found = subprocess.run(
        ["grep", "-a", "-l", "-F", "-e", secret, *files],
        check=False,
        capture_output=True,
        text=True,
    )
    assert found.returncode in (0, 1), found.stderr  # 1: found nowhere
    return found.stdout.split()
