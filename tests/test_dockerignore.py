""".dockerignore with Docker's own rules: the same files reach the image as with the
docker CLI (Debian's 20.10, DOCKER_BUILDKIT=1) on the same engine, whether the context
is uploaded by `deploy-agent deploy`, sent as a tar by an API client, or cloned from git;
and an ignored 600 MiB file costs the upload nothing."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from agent.cli.client import Client, Target
from agent.cli.deploy import pack, submit_directory
from agent.dockerignore import DockerIgnore, IgnoreFileError
from tests.support.dockerd import Dockerd
from tests.support.leader import InProcessLeader

DOCKER_20_10 = "/usr/bin/docker"  # Debian's CLI: the one on PATH may refuse DOCKER_BUILDKIT
TREE = [
    "a.txt",
    "b.log",
    "c/d.txt",
    "c/e.log",
    "c/f/g.txt",
    "c/f/h.md",
    "docs/readme.md",
    "docs/api/x.md",
    "node_modules/pkg/index.js",
    "node_modules/keep.js",
    "build/out.bin",
    "src/build/kept.txt",
    ".env",
    ".hidden/x",
    "src/main.py",
    "src/test_main.py",
    "src/sub/test_deep.py",
    "src/sub/deep/file.py",
    "weird name.txt",
    "dir.with.dots/file",
    "secret.key",
    "Secret.KEY",
    "tmp/1/x",
    "tmp/22/x",
]
PATTERNS = """\ufeff# a comment, and an empty line

*.log
!c/e.log
**/*.md
!docs/readme.md
node_modules
!node_modules/keep.js
/build
.env
src/**/test_*.py
**/deep
   weird name.txt
dir.with.dots/
*.key
tmp/?/
"""


def _tree(root: Path) -> Path:
    root.mkdir(parents=True)
    for name in TREE:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"{name}\n")
    (root / ".dockerignore").write_text(PATTERNS)
    (root / "Dockerfile").write_text("FROM scratch\nCOPY . /ctx/\n")
    return root


def _files_in(engine: Dockerd, image: str) -> set[str]:
    """The files under /ctx of the image, read from an export of a container of it."""
    container = engine.cli("create", image, "unused").stdout.strip()
    try:
        exported = subprocess.run(
            ["docker", "-H", engine.url, "export", container],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    finally:
        engine.cli("rm", container)
    with tarfile.open(fileobj=io.BytesIO(exported)) as archive:
        files = [m.name for m in archive.getmembers() if m.isfile()]
    return {name.removeprefix("ctx/") for name in files if name.startswith("ctx/")}


def _docker_cli_sees(engine: Dockerd, context: Path) -> set[str]:
    tag = f"dockerignore-cli:{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [DOCKER_20_10, "-H", engine.url, "build", "-q", "-t", tag, str(context)],
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
        capture_output=True,
        check=True,
        timeout=120,
    )
    return _files_in(engine, tag)


@pytest.fixture
async def docker_cli_files(dockerd: Dockerd, tmp_path: Path) -> set[str]:
    """What the docker CLI's build puts under /ctx for the tree and its patterns."""
    files = await asyncio.to_thread(_docker_cli_sees, dockerd, _tree(tmp_path / "for-docker"))
    assert "a.txt" in files and "b.log" not in files, files  # the patterns did something
    return files


async def test_the_cli_upload_matches_the_docker_cli(
    leader: InProcessLeader, dockerd: Dockerd, docker_cli_files: set[str], tmp_path: Path
) -> None:
    """`deploy-agent deploy`'s upload: the image holds exactly what docker build's does."""
    context = _tree(tmp_path / "ours")
    target = Target(url=leader.api.base_url, token=leader.api.token)
    async with Client(target) as client:
        dep = await submit_directory(client, context, [("app", "ignored")], None)
    final = await leader.api.wait_final(dep["id"])

    assert final["state"] == "succeeded", final["error"]
    assert await asyncio.to_thread(_files_in, dockerd, final["image"]) == docker_cli_files


async def test_an_api_upload_of_everything_is_filtered_by_the_leader(
    leader: InProcessLeader, dockerd: Dockerd, docker_cli_files: set[str], tmp_path: Path
) -> None:
    """A tar of the whole tree sent by an API client: the leader applies the archive's
    .dockerignore (BuildKit through the API would not), so the image is docker build's."""
    dep = await leader.api.deploy_dir(_tree(tmp_path / "ours"), "ignored")
    final = await leader.api.wait_final(dep["id"])

    assert final["state"] == "succeeded", final["error"]
    assert await asyncio.to_thread(_files_in, dockerd, final["image"]) == docker_cli_files


async def test_a_git_source_is_packed_without_its_ignored_files(
    leader: InProcessLeader, dockerd: Dockerd, docker_cli_files: set[str], tmp_path: Path
) -> None:
    """A git source: the leader packs the clone with its .dockerignore applied."""
    repo = _tree(tmp_path / "repo")
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "tree"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True, env=env)
    status, dep = await leader.api.request(
        "POST",
        "/v1/deployments",
        json={"app": "ignored", "git": {"url": f"file://{repo}", "ref": "main"}},
    )
    assert status == 202, dep
    final = await leader.api.wait_final(dep["id"])

    assert final["state"] == "succeeded", final["error"]
    assert await asyncio.to_thread(_files_in, dockerd, final["image"]) == docker_cli_files


async def test_an_ignored_600_mib_file_stays_out_of_a_fast_upload(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """A 600 MiB file that .dockerignore names is never read: the archive stays small
    and packing plus the upload take under a second."""
    context = tmp_path / "big"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM scratch\nCOPY . /ctx/\n")
    (context / "app.txt").write_text("app\n")
    with (context / "data.bin").open("wb") as data:
        data.write(os.urandom(1024 * 1024))  # not all holes: it is a real file
        data.truncate(600 * 1024 * 1024)
    (context / ".dockerignore").write_text("data.bin\n")
    target = Target(url=leader.api.base_url, token=leader.api.token)

    async with Client(target) as client:
        started = time.monotonic()
        dep = await submit_directory(client, context, [("app", "big")], None)
        took = time.monotonic() - started
    packed = tmp_path / "packed.tar.gz"
    await asyncio.to_thread(pack, context, packed)

    assert took < 1.0, f"the upload took {took:.2f} s"
    assert packed.stat().st_size < 64 * 1024
    with tarfile.open(packed) as archive:
        assert "data.bin" not in archive.getnames()
    assert (await leader.api.wait_final(dep["id"]))["state"] == "succeeded"


@pytest.mark.parametrize(
    ("patterns", "path", "excluded"),
    [
        ("*.log", "a.log", True),
        ("*.log", "sub/a.log", False),  # * does not cross a slash, nor is it any depth
        ("**/*.log", "sub/deeper/a.log", True),
        ("**/*.log", "a.log", True),
        ("/build", "build/x", True),  # a leading slash is the root, as without it
        ("build", "src/build/x", False),
        ("docs\n!docs/keep.md", "docs/keep.md", False),
        ("docs\n!docs/keep.md", "docs/other.md", True),
        ("!x\n*", "x", True),  # the last pattern that matches decides
        ("# *.md", "a.md", False),
        ("*.KEY", "a.key", False),  # case matters
        ("tmp/?", "tmp/22", False),
    ],
)
def test_docker_rules(patterns: str, path: str, excluded: bool) -> None:
    """Docker's pattern rules, one case each."""
    assert DockerIgnore(patterns).excluded(path) is excluded


def test_a_pattern_docker_refuses_is_an_error_naming_the_file() -> None:
    """An unterminated `[`: Docker refuses the build, and so do we, naming .dockerignore."""
    with pytest.raises(IgnoreFileError, match=r"\.dockerignore"):
        DockerIgnore("[abc\n")


def test_the_walk_does_not_enter_an_ignored_tree_unless_an_exception_may_reach_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ignored directory is not listed (so not read) unless a `!` pattern could bring
    back something below it; the Dockerfile stays when asked to keep it."""
    for name in ("node_modules/a/b.js", "node_modules/keep.js", "cache/x", "Dockerfile"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    ignore = DockerIgnore("node_modules\n!node_modules/keep.js\ncache\nDockerfile\n")
    entered: list[str] = []
    original = os.scandir

    def spying(path: str) -> object:
        entered.append(os.path.relpath(path, tmp_path))
        return original(path)

    monkeypatch.setattr(os, "scandir", spying)
    walked = list(ignore.walk(tmp_path, keep=frozenset({"Dockerfile"})))

    assert walked == ["Dockerfile", "node_modules/keep.js"]
    assert "cache" not in entered
