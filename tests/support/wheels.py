"""Wheels for installing deploy-agent the way a host would: the package's own wheel, built
from this checkout, and its dependencies' wheels beside it, so installs need no index."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check")


@dataclass(frozen=True)
class Wheelhouse:
    directory: Path  # dependency wheels only
    wheel: Path  # deploy-agent's own

    @classmethod
    def build(cls) -> Wheelhouse:
        root = Path(tempfile.mkdtemp(prefix="da-wheels-"))
        subprocess.run(
            [*PIP_WHEEL, "-w", str(root), str(ROOT)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        own = root / "own"
        own.mkdir()
        (wheel,) = root.glob("deploy_agent-*.whl")
        return cls(root, wheel.rename(own / wheel.name))

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
