"""Build contexts of the tests' own: FROM scratch, with the static busybox copied in."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

BUSYBOX = Path("/bin/busybox")


def busybox_context(directory: Path, *steps: str, cmd: str = "echo hello") -> Path:
    """A context whose image runs `cmd` under busybox sh; `steps` go between COPY and CMD.

    Each context is its own: an ENV line unique to it follows the busybox layer, so the
    engine's build cache never serves one test's steps from another's build (the busybox
    layer itself is shared), and every RUN step really runs.
    """
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, directory / "busybox")
    marker = f"ENV TEST_CONTEXT={os.urandom(8).hex()}"
    lines = ["FROM scratch", "COPY busybox /bin/busybox", marker, *steps]
    lines.append(f'CMD ["/bin/busybox", "sh", "-c", "{cmd}"]')
    (directory / "Dockerfile").write_text("\n".join(lines) + "\n")
    return directory


def run_step(shell: str) -> str:
    """A RUN step for a scratch image: busybox's sh, named by absolute path."""
    return f'RUN ["/bin/busybox", "sh", "-c", "{shell}"]'


def bulky_context(directory: Path, mbytes: int) -> Path:
    """A busybox context with a layer of `mbytes` MiB of random bytes: it does not
    compress and no engine holds it yet, so pushing and pulling it takes real time."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bulk").write_bytes(os.urandom(mbytes * 1024 * 1024))
    return busybox_context(directory, "COPY bulk /bulk")


def features_context(directory: Path, cache_id: str) -> Path:
    """A context whose Dockerfile uses what BuildKit gives: two independent stages (each
    a 2 s RUN), a `test` stage for --target, a build argument, COPY --chmod, COPY --link
    and a RUN with a cache mount (`cache_id`) that counts its runs in the cache."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, directory / "busybox")
    (directory / "tool.sh").write_text("echo tool\n")
    (directory / "data.txt").write_text("linked data\n")
    cache = f"--mount=type=cache,id={cache_id},target=/cache"
    lines = [
        "FROM scratch AS base",
        "COPY busybox /bin/busybox",
        f"ENV TEST_CONTEXT={os.urandom(8).hex()}",
        "FROM base AS left",
        run_step("echo left-start; /bin/busybox sleep 2; echo left > /left"),
        "FROM base AS right",
        run_step("echo right-start; /bin/busybox sleep 2; echo right > /right"),
        "FROM base AS test",
        run_step("echo tested > /stage"),
        'CMD ["/bin/busybox", "cat", "/stage"]',
        "FROM base",
        "ARG GREETING=hello",
        "COPY --from=left /left /left",
        "COPY --from=right /right /right",
        "COPY --chmod=0750 tool.sh /tool.sh",
        "COPY --link data.txt /data.txt",
        f'RUN {cache} ["/bin/busybox", "sh", "-c", '
        '"echo greeting=$GREETING; echo runs-before=$(cat /cache/runs 2>/dev/null | '
        '/bin/busybox wc -l); echo run >> /cache/runs; echo $GREETING > /greeting"]',
        'CMD ["/bin/busybox", "cat", "/greeting"]',
    ]
    (directory / "Dockerfile").write_text("\n".join(lines) + "\n")
    return directory
