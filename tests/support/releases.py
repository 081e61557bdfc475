"""Earlier releases of the agent, installed as a node would have them: the wheel kept in
tests/releases/ over the locked dependencies, in a virtualenv of its own."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.wheels import REQUIREMENTS, ROOT, run, source_copy, tool

RELEASES = ROOT / "tests" / "releases"
PREVIOUS = RELEASES / "deploy_agent-0.1.0-py3-none-any.whl"
GUARD = ROOT / "systemd" / "deploy-agent-guard"
PREVIOUS_SHA256 = "b2821c0cf45c051da99885040a414be35e03e38a88f7f76ccb15f732f7b833a0"


@dataclass(frozen=True)
class Installed:
    venv: Path

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def version(self) -> str:
        return run(self.venv / "bin" / "deploy-agent", "--version").split()[-1]

    def cleanup(self) -> None:
        shutil.rmtree(self.venv, ignore_errors=True)


def install_release(wheel: Path, sha256: str) -> Installed:
    """A virtualenv with the release `wheel` (checked against `sha256`) and this release's
    locked dependencies, which the earlier release's ranges admit."""
    found = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert found == sha256, f"{wheel.name} is not the release it was kept as ({found})"
    venv = Path(tempfile.mkdtemp(prefix="da-release-")) / "venv"
    uv = tool("uv")
    run(uv, "venv", "-q", "--python", "python3", venv)
    env_args = ("--python", str(venv / "bin" / "python"))
    run(uv, "pip", "install", "-q", *env_args, "--require-hashes", "-r", REQUIREMENTS)
    run(uv, "pip", "install", "-q", *env_args, "--no-deps", wheel)
    return Installed(venv)


def build_release(out: Path, version: str, *, patch: tuple[str, str, str] | None = None) -> Path:
    """A wheel of this checkout labelled `version`; `patch` (file, old, new) breaks it
    on purpose, as a bad release would be."""
    with tempfile.TemporaryDirectory(prefix="da-source-") as scratch:
        source = source_copy(Path(scratch))
        pyproject = source / "pyproject.toml"
        text = pyproject.read_text()
        assert '\nversion = "' in text
        pyproject.write_text(re.sub(r'\nversion = "[^"]+"', f'\nversion = "{version}"', text))
        if patch is not None:
            path, old, new = patch
            code = (source / path).read_text()
            assert old in code, f"{path} has no {old!r}"
            (source / path).write_text(code.replace(old, new, 1))
        out.mkdir(parents=True, exist_ok=True)
        run(tool("uv"), "build", "-q", "--wheel", "--out-dir", out, source)
    return out / f"deploy_agent-{version}-py3-none-any.whl"


@dataclass(frozen=True)
class Layout:
    """PREFIX/bin/deploy-agent-guard and PREFIX/releases/, as bootstrap makes them."""

    prefix: Path

    @property
    def releases(self) -> Path:
        return self.prefix / "releases"

    @property
    def guard(self) -> Path:
        return self.prefix / "bin" / "deploy-agent-guard"

    def current(self) -> str:
        return os.readlink(self.releases / "current")

    def versions(self) -> set[str]:
        return {p.name for p in self.releases.iterdir() if p.is_dir() and not p.is_symlink()}


def install_layout(prefix: Path, wheel: Path, wheelhouse: Path) -> Layout:
    """`wheel` installed as the current release under `prefix`, with the guard."""
    layout = Layout(prefix)
    version = wheel.name.split("-")[1]
    venv = layout.releases / version / "venv"
    run(sys.executable, "-m", "venv", venv)  # with its own pip, as on a node
    pip = (venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile")
    run(*pip, "--no-index", "--find-links", wheelhouse, "--require-hashes", "-r", REQUIREMENTS)
    run(*pip, "--no-index", "--no-deps", wheel)
    (layout.releases / "current").symlink_to(version)
    layout.guard.parent.mkdir(parents=True)
    shutil.copy(GUARD, layout.guard)
    return layout
