"""systemd-analyze on unit files: a root tree to verify a unit in, and its directives."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: ./scripts/test installs the systemd package"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, check=False)


def verify(tmp_path: Path, name: str, text: str, executable: str) -> str:
    """`systemd-analyze verify` of the unit `text` as `name` in a root tree holding the
    system's units and a stand-in for its program; everything it said, "" when clean."""
    root = tmp_path / name
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system" / name).write_text(text)
    program = root / executable.lstrip("/")
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    done = analyze("verify", f"--root={root}", name)
    return done.stdout + done.stderr + ("" if done.returncode == 0 else f"exit {done.returncode}")


def directives(text: str) -> dict[str, list[str]]:
    """Each `Key=value` of a unit, every value a key was given, in order."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            found.setdefault(key.strip(), []).append(value.strip())
    return found
