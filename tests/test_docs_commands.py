"""The quick starts work as written: every shell block of the README and of the docs'
quick start runs, in order, in one shell, as a person pasting them would, in a sandbox:
a copy of the checkout, an engine of the test's own (DOCKER_HOST), and a network
namespace with nothing but loopback, so the ports the blocks name are free.

A block that must not run here carries the marker `<!-- docs-test: skip (REASON) -->`
on the line before its fence (docs/development.md says so too)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.dockerd import Dockerd
from tests.support.wheels import ROOT, Wheelhouse, source_copy, tool

# The pages whose blocks are a quick start; a docs page includes the README's blocks.
QUICK_STARTS = ("README.md", "docs/index.md")
BLOCK = re.compile(
    r"^(?:(?P<marker><!-- docs-test:[^\n]*-->)\n)?```sh\n(?P<code>.*?)^```$", re.M | re.S
)
SKIP = re.compile(r"<!-- docs-test: skip \((?P<reason>.+)\) -->")
SNIPPET = re.compile(r'^--8<-- "(?P<file>[^":]+):(?P<section>[\w-]+)"$', re.M)


@dataclass(frozen=True)
class Block:
    where: str  # page and line
    code: str
    skip_reason: str | None


def _expand(page: str) -> str:
    """The page with its snippet includes replaced by the sections they name."""

    def section(found: re.Match[str]) -> str:
        text = (ROOT / found["file"]).read_text()
        start = text.index(f"--8<-- [start:{found['section']}]")
        start = text.index("\n", start) + 1
        return text[start : text.index(f"<!-- --8<-- [end:{found['section']}]", start)]

    return SNIPPET.sub(section, page)


def blocks() -> list[Block]:
    """Every shell block of the quick starts, in page order, each once."""
    found: list[Block] = []
    seen: set[str] = set()
    for name in QUICK_STARTS:
        page = _expand((ROOT / name).read_text())
        for match in BLOCK.finditer(page):
            if match["code"] in seen:
                continue
            seen.add(match["code"])
            marker = match["marker"]
            skip = SKIP.fullmatch(marker) if marker else None
            assert marker is None or skip, f"{name}: unknown marker {marker}"
            line = page.count("\n", 0, match.start("code"))
            where = f"{name}:{line}"
            found.append(Block(where, match["code"], skip["reason"] if skip else None))
    return found


def test_the_quick_starts_have_blocks_and_say_why_one_is_skipped() -> None:
    """The collector finds the README's blocks (a changed layout would let the test below
    pass on nothing), and each skipped block gives its reason."""
    found = blocks()
    assert sum(b.skip_reason is None for b in found) >= 2, found
    assert all(b.skip_reason is None or b.skip_reason.strip() for b in found)
    assert any("deploy-agent deploy" in b.code for b in found if b.skip_reason is None)


def _script(found: list[Block]) -> str:
    """One shell script of the blocks to run, stopping at the first that fails, each
    announced so that a failure says which block it was."""
    parts = ["set -eo pipefail"]
    for block in found:
        if block.skip_reason is None:
            parts += [f"echo '>>> {block.where}'", block.code]
    parts.append("echo '>>> done'")
    return "\n".join(parts) + "\n"


def _environment(engine: Dockerd, wheelhouse: Path, home: Path) -> dict[str, str]:
    """A newcomer's shell: the machine's PATH without this suite's virtualenv, the test's
    engine as DOCKER_HOST, and pip finding the locked wheels offline."""
    path = [p for p in os.environ["PATH"].split(":") if not p.startswith(str(ROOT))]
    return {
        "PATH": ":".join(path),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "DOCKER_HOST": engine.url,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheelhouse),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }


def _add_uv(wheelhouse: Path) -> None:
    """uv's wheel, which the quick start installs (scripts/uv.txt), beside the others."""
    pip = (tool("pip"), "download", "-q", "--require-hashes", "--only-binary", ":all:")
    subprocess.run(
        [*pip, "-d", str(wheelhouse), "-r", str(ROOT / "scripts" / "uv.txt")],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.timeout(600)
def test_the_quick_starts_run_as_written(tmp_path: Path, wheelhouse: Wheelhouse) -> None:
    """Pasted in order into one shell, the quick start's blocks install deploy-agent from
    the lock, start a leader, deploy the example app (exit 0) and stop the leader."""
    _add_uv(wheelhouse.directory)
    checkout = source_copy(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    engine = Dockerd(bridge=True)  # as installed: RUN steps use the default bridge
    engine.start()
    shell = None
    try:
        shell = subprocess.Popen(
            ["unshare", "--net", "bash", "-c", "ip link set lo up && exec bash -s"],
            cwd=checkout,
            env=_environment(engine, wheelhouse.directory, home),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        output, _ = shell.communicate(_script(blocks()), timeout=540)
    finally:
        if shell is not None and shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
        leader_log = checkout / ".quickstart" / "leader.log"
        log = leader_log.read_text()[-3000:] if leader_log.exists() else "(no leader log)"
        _stop_leader(checkout / ".quickstart" / "leader.pid")
        engine.stop()
    assert shell.returncode == 0, f"{output[-6000:]}\n--- leader.log:\n{log}"
    assert output.rstrip().endswith(">>> done"), output[-3000:]
    assert "succeeded" in output, output[-3000:]


def _stop_leader(pid_file: Path) -> None:
    """The leader a failed run left behind (the quick start's last line stops it): the
    process the pid file names, if it still runs in the quick start's directory."""
    try:
        pid = int(pid_file.read_text())
        if Path(f"/proc/{pid}/cwd").resolve() == pid_file.parent.resolve():
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass
