"""Build contexts of the tests' own: FROM scratch, with the static busybox copied in."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

BUSYBOX = Path("/bin/busybox")


def busybox_context(directory: Path, *steps: str, cmd: str = "echo hello") -> Path:
    """A context whose image runs `cmd` under busybox sh; `steps` go between COPY and CMD.

    Each context is its own: an ENV line unique to it follows the busybox layer, so the
    engine's build cache never serves one test's steps from another's build (the busybox
    layer itself is shared), and every RUN step really runs.
    """
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, directory / "busybox")
    marker = f"ENV TEST_CONTEXT={os.urandom(8).hex()}"
    lines = ["FROM scratch", "COPY busybox /bin/busybox", marker, *steps]
    lines.append(f'CMD ["/bin/busybox", "sh", "-c", "{cmd}"]')
    (directory / "Dockerfile").write_text("\n".join(lines) + "\n")
    return directory


def run_step(shell: str) -> str:
    """A RUN step for a scratch image: busybox's sh, named by absolute path."""
    return f'RUN ["/bin/busybox", "sh", "-c", "{shell}"]'


def bulky_context(directory: Path, mbytes: int) -> Path:
    """A busybox context with a layer of `mbytes` MiB of random bytes: it does not
    compress and no engine holds it yet, so pushing and pulling it takes real time."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bulk").write_bytes(os.urandom(mbytes * 1024 * 1024))
    return busybox_context(directory, "COPY bulk /bulk")
