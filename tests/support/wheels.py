"""Wheels for installing deploy-agent the way a host would: the package's own wheel, built
from this checkout, and its dependencies' wheels beside it, so installs need no index.

The dependencies are the locked ones (requirements.txt, checked by their hashes), as on a
node. Every build works on its own copy of the checkout, so that two test processes
building at once never share a build directory.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements.txt"
NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    ".venv*",
    ".tools",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".demo",
    ".quickstart",
    "venv",
    "site",
)


def tool(name: str) -> str:
    """uv or pip from the tools virtualenv the set-up scripts make (scripts/lib.sh)."""
    found = ROOT / ".tools" / "bin" / name
    if not found.exists():
        raise RuntimeError(f"{found} is missing: run ./scripts/test, which installs it")
    return str(found)


def source_copy(directory: Path) -> Path:
    """A copy of the checkout's sources in `directory`, for a build of its own."""
    target = directory / "source"
    shutil.copytree(ROOT, target, ignore=NOT_SOURCES)
    return target


def run(*args: str | Path, timeout: float = 300) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{args[:3]} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return done.stdout


def build_wheel(out: Path, *, sdist: bool = False) -> Path:
    """deploy-agent's wheel (and sdist, if asked) built from a copy of the checkout."""
    with tempfile.TemporaryDirectory(prefix="da-source-") as scratch:
        kinds = ("--wheel", "--sdist") if sdist else ("--wheel",)
        run(tool("uv"), "build", "-q", *kinds, "--out-dir", out, source_copy(Path(scratch)))
    (wheel,) = out.glob("deploy_agent-*.whl")
    return wheel


def download_dependencies(out: Path) -> None:
    """The locked runtime dependencies' wheels, checked against their hashes."""
    run(
        *(tool("pip"), "download", "-q", "--disable-pip-version-check", "--require-hashes"),
        *("--only-binary", ":all:", "-d", out, "-r", REQUIREMENTS),
    )


@dataclass(frozen=True)
class Wheelhouse:
    directory: Path  # dependency wheels only
    wheel: Path  # deploy-agent's own

    @classmethod
    def build(cls) -> Wheelhouse:
        root = Path(tempfile.mkdtemp(prefix="da-wheels-"))
        download_dependencies(root)
        own = root / "own"
        own.mkdir()
        return cls(root, build_wheel(own))

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
