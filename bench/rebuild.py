"""Rebuild after a one-line change to an app's source: a deployment through the leader
next to `DOCKER_BUILDKIT=1 docker build` and the classic builder, on the same engine.

    python -m bench.rebuild --runs 7

Starts its own Docker Engine (Debian's 20.10, as the tests do) and a leader in local
mode. The app: a vendor archive of a few MB that a dependency step unpacks and
compresses file by file (seconds of work) into a cache mount, and a source file that
the same step then builds. Each build follows a change to one line of the source, so
the step runs every time: with the cache mount (the leader and docker build, both
BuildKit) it finds the dependencies done; the classic builder has no cache mounts and
does them again. Every build sees a source of its own, so none reuses another's layers.
Prints the median seconds of each and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.cli.client import Client, Target
from agent.cli.deploy import submit_directory
from agent.eventloop import daemon_loop
from bench.scratch import scratch_dir
from tests.support.contexts import BUSYBOX
from tests.support.dockerd import Dockerd
from tests.support.leader import InProcessLeader, leader_config

DOCKER_20_10 = "/usr/bin/docker"  # Debian's CLI: it still builds classic and BuildKit both
VENDOR_FILES = 1200
VENDOR_FILE_BYTES = 4096
SOURCE_LINES = 50
# Unpack the vendor archive and compress each file, once per cache; then "build" the
# source against it. Classic has no cache mount: it always takes the first branch, and
# clears /cache after, as a Dockerfile written for it would, not to ship it.
STEP = (
    "set -e; if [ ! -f /cache/done ]; then mkdir -p /cache/deps; "
    "tar xf /vendor.tar -C /cache/deps; "
    "for f in /cache/deps/*; do gzip -9 -c $f > $f.gz; done; touch /cache/done; fi; "
    "mkdir -p /app; cat /cache/deps/*.gz | wc -c > /app/deps.size; "
    "sha256sum /src/app.txt > /app/build.txt"
)
CACHE_MOUNT = "--mount=type=cache,id=bench-rebuild,target=/cache"


def _context(root: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "busybox")
    vendor = root / "vendor"
    vendor.mkdir()
    for index in range(VENDOR_FILES):
        (vendor / f"dep{index:04}.js").write_bytes(os.urandom(VENDOR_FILE_BYTES))
    subprocess.run(["tar", "cf", str(root / "vendor.tar"), "-C", str(vendor), "."], check=True)
    shutil.rmtree(vendor)
    (root / "src").mkdir()
    _change_source(root, "initial")
    head = ["FROM scratch", "COPY busybox /bin/busybox", "COPY vendor.tar /vendor.tar"]
    run = f'["/bin/busybox", "sh", "-c", "{STEP}"]'
    classic_run = run.replace('"]', '; rm -rf /cache"]')
    for name, step in (("Dockerfile", f"{CACHE_MOUNT} {run}"), ("Dockerfile.classic", classic_run)):
        (root / name).write_text("\n".join([*head, "COPY src /src", f"RUN {step}"]) + "\n")
    return root


def _change_source(root: Path, marker: str) -> None:
    """The source with one line that differs from every earlier build's."""
    lines = [f"line {n}" for n in range(SOURCE_LINES)]
    lines[SOURCE_LINES // 2] = f"changed {marker}"
    (root / "src" / "app.txt").write_text("\n".join(lines) + "\n")


def _docker_build(engine: Dockerd, env: dict[str, str], root: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [DOCKER_20_10, "-H", engine.url, "build", "-q", *args, str(root)],
        env=env,
        capture_output=True,
        check=True,
        timeout=600,
    )
    return time.perf_counter() - started


async def _deploy(leader: InProcessLeader, root: Path) -> float:
    """As `deploy-agent deploy --context` does it: pack, upload, follow to the end."""
    started = time.perf_counter()
    async with Client(Target(url=leader.api.base_url, token=leader.api.token)) as client:
        dep = await submit_directory(client, root, [("app", "rebuild")], None)
    final = await leader.api.wait_final(dep["id"], timeout=600)
    assert final["state"] == "succeeded", final
    return time.perf_counter() - started


async def _measure(
    engine: Dockerd, leader: InProcessLeader, root: Path, work: Path, runs: int
) -> dict[str, list[float]]:
    config = {"DOCKER_CONFIG": str(work / "docker-config")}
    buildkit = {**os.environ, **config, "DOCKER_BUILDKIT": "1"}
    classic = {**os.environ, **config, "DOCKER_BUILDKIT": "0"}
    ways: dict[str, Callable[[], Awaitable[float]]] = {
        "leader": lambda: _deploy(leader, root),
        "docker buildkit": lambda: asyncio.to_thread(
            _docker_build, engine, buildkit, root, "--network", "host", "-t", "bench:buildkit"
        ),
        "docker classic": lambda: asyncio.to_thread(
            _docker_build, engine, classic, root, "-f", f"{root}/Dockerfile.classic", "-t", "c:1"
        ),
    }
    figures: dict[str, list[float]] = {name: [] for name in ways}
    for run in range(-1, runs):  # run -1 warms each up (the cache mount, the base layers)
        for name, way in ways.items():
            _change_source(root, f"{name} {run}")
            seconds = await way()
            if run >= 0:
                figures[name].append(seconds)
    return figures


async def main(runs: int, json_out: Path | None) -> None:
    with scratch_dir("bench-rebuild-") as work:
        engine = Dockerd()
        engine.start()
        leader = InProcessLeader(leader_config(work / "state", engine.url))
        await leader.start()
        try:
            root = _context(work / "app")
            figures = await _measure(engine, leader, root, work, runs)
        finally:
            await leader.stop()
            engine.stop()
    _report(figures, runs, json_out)


def _report(figures: dict[str, list[float]], runs: int, json_out: Path | None) -> None:
    med = {name: statistics.median(values) for name, values in figures.items()}
    print(f"runs: {runs} (median seconds of a rebuild after a one-line change)")
    for name, value in med.items():
        every = ", ".join(f"{v:.2f}" for v in figures[name])
        print(f"  {name:<16} {value:6.2f} s   (each: {every})")
    vs_buildkit = med["leader"] / med["docker buildkit"]
    vs_classic = med["docker classic"] / med["leader"]
    print(f"  leader / docker buildkit: {vs_buildkit:.2f} (goal: at most 1.10)")
    print(f"  docker classic / leader: {vs_classic:.2f}x (goal: at least 2)")
    if json_out is not None:
        doc = {"runs": runs, "median_s": med, "all_s": figures}
        doc |= {"leader_vs_buildkit": vs_buildkit, "classic_vs_leader": vs_classic}
        json_out.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=daemon_loop()) as runner:  # the leader's loop as deployed
        runner.run(main(args.runs, args.json))
