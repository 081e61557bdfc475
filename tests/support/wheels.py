"""Wheels for installing deploy-agent the way a host would: the package's own wheel, built
from this checkout, and its dependencies' wheels beside it, so installs need no index.

Every build works on its own copy of the checkout: setuptools builds in the source tree
(build/, *.egg-info), and two test processes building there at once break each other.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check")
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".demo"
)


def source_copy(directory: Path) -> Path:
    """A copy of the checkout's sources in `directory`, for a build of its own."""
    target = directory / "source"
    shutil.copytree(ROOT, target, ignore=NOT_SOURCES)
    return target


@dataclass(frozen=True)
class Wheelhouse:
    directory: Path  # dependency wheels only
    wheel: Path  # deploy-agent's own

    @classmethod
    def build(cls) -> Wheelhouse:
        root = Path(tempfile.mkdtemp(prefix="da-wheels-"))
        with tempfile.TemporaryDirectory(prefix="da-source-") as scratch:
            done = subprocess.run(
                [*PIP_WHEEL, "-w", str(root), str(source_copy(Path(scratch)))],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        if done.returncode != 0:
            raise RuntimeError(f"pip wheel failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        own = root / "own"
        own.mkdir()
        (wheel,) = root.glob("deploy_agent-*.whl")
        return cls(root, wheel.rename(own / wheel.name))

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
