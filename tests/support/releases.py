"""Earlier releases of the agent, installed as a node would have them: the wheel kept in
tests/releases/ over the locked dependencies, in a virtualenv of its own."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.wheels import REQUIREMENTS, ROOT, run, tool

RELEASES = ROOT / "tests" / "releases"
PREVIOUS = RELEASES / "deploy_agent-0.1.0-py3-none-any.whl"
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
