"""Packaging: `uv build` makes a wheel and an sdist, and the wheel installed into a fresh
virtualenv from the locked requirements gives a working `deploy-agent` that reports the
package's version and starts without a warning."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import version
from pathlib import Path

from tests.support.wheels import REQUIREMENTS, Wheelhouse, build_wheel

UNITS = ("deploy-agent-leader.service", "deploy-agent-worker.service")


def _run(*args: str | Path) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_wheel_and_sdist_build_and_the_wheel_installs(
    tmp_path: Path, wheelhouse: Wheelhouse
) -> None:
    """Both artefacts carry the version and the systemd units; the installed script prints
    `deploy-agent VERSION` and validates a config."""
    expected = version("deploy-agent")
    wheel = build_wheel(tmp_path / "dist", sdist=True)

    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    assert wheel.name == f"deploy_agent-{expected}-py3-none-any.whl"
    assert sdist.name == f"deploy_agent-{expected}.tar.gz"
    with zipfile.ZipFile(wheel) as archive:
        assert {f"agent/units/{u}" for u in UNITS} <= set(archive.namelist())
    with tarfile.open(sdist) as archive:
        names = set(archive.getnames())
    assert {f"deploy_agent-{expected}/systemd/{u}" for u in UNITS} <= names

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    pip = (venv / "bin/pip", "install", "-q", "--disable-pip-version-check")
    _run(
        *pip,
        "--no-index",
        "--find-links",
        wheelhouse.directory,
        "--require-hashes",
        "-r",
        REQUIREMENTS,
    )
    _run(*pip, "--no-index", "--no-deps", wheel)

    assert _run(venv / "bin/deploy-agent", "--version") == f"deploy-agent {expected}\n"
    # nothing but the version: no warning from a dependency at import
    quiet = subprocess.run(
        [venv / "bin/python", "-W", "error", "-c", "import agent.cli.main, agent.daemon"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (quiet.returncode, quiet.stderr) == (0, "")
    config = tmp_path / "worker.toml"
    config.write_text('role = "worker"\n[worker]\nleader_url = "https://leader:7443"\n')
    assert "ok (role worker)" in _run(venv / "bin/deploy-agent", "check-config", "-c", config)
