"""What the benchmarks share: fresh build contexts and docker CLI calls on a given engine."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from tests.support.contexts import busybox_context, run_step
from tests.support.dockerd import Dockerd
from tests.support.registry import Registry


def fresh_context(root: Path) -> Path:
    """A busybox context whose unique file comes before the RUN step: nothing is cached."""
    ctx = busybox_context(
        root / uuid.uuid4().hex, "COPY unique.txt /unique.txt", run_step("echo build step")
    )
    (ctx / "unique.txt").write_text(uuid.uuid4().hex)
    return ctx


def docker(engine: Dockerd, env: dict[str, str], *args: str, stdin: str | None = None) -> None:
    subprocess.run(
        ["docker", "-H", engine.url, *args],
        env=env,
        input=stdin,
        text=True,
        capture_output=True,
        check=True,
        timeout=300,
    )


def docker_login(engine: Dockerd, env: dict[str, str], registry: Registry) -> None:
    """Log the docker CLI in, as a person would before `docker push` or `docker pull`."""
    docker(
        engine,
        env,
        "login",
        "-u",
        registry.username,
        "--password-stdin",
        registry.host,
        stdin=registry.password,
    )
