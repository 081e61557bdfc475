"""Time a small deployment through the leader next to the docker CLI doing the same steps.

    python -m bench.deploy_time --runs 5

Starts its own Docker Engine and registry (with a login) on loopback. Each run builds a
fresh context (a unique file defeats the build cache) four ways, in turn: `docker build`,
a local-mode deployment, `docker build && docker push`, a registry-mode deployment.
Prints medians, the ratio and the seconds the agent adds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

from agent.eventloop import daemon_loop
from bench.common import docker, docker_login, fresh_context
from bench.scratch import scratch_dir
from tests.support.api import tar_of
from tests.support.dockerd import Dockerd
from tests.support.leader import InProcessLeader, leader_config
from tests.support.registry import Registry


async def _timed_deploy(leader: InProcessLeader, ctx: Path, app: str) -> float:
    """Submit as the docker CLI sends a context (plain tar) and wait for the final state."""
    started = time.perf_counter()
    status, dep = await leader.api.request(
        "POST",
        "/v1/deployments",
        params={"app": app},
        data=tar_of(ctx, gzip=False),
        headers={"Content-Type": "application/x-tar"},
    )
    assert status == 202, dep
    final = await leader.api.wait_final(dep["id"])
    assert final["state"] == "succeeded", final
    return time.perf_counter() - started


async def _timed_cli(
    engine: Dockerd, env: dict[str, str], ctx: Path, ref: str, push: bool
) -> float:
    started = time.perf_counter()
    await asyncio.to_thread(docker, engine, env, "build", "-q", "-t", ref, str(ctx))
    if push:
        await asyncio.to_thread(docker, engine, env, "push", "-q", ref)
    return time.perf_counter() - started


async def main(runs: int) -> None:
    with scratch_dir("bench-deploy-") as work:
        await _main(runs, work)


async def _main(runs: int, work: Path) -> None:
    engine, registry = Dockerd(), Registry()
    engine.start()
    registry.start()
    env = {**os.environ, "DOCKER_CONFIG": str(work / "docker-config"), "DOCKER_BUILDKIT": "0"}
    leader = InProcessLeader(leader_config(work / "state", engine.url))
    await leader.start()
    try:
        docker_login(engine, env, registry)
        figures = await _measure(engine, registry, leader, env, work=work, runs=runs)
    finally:
        await leader.stop()
        registry.cleanup()
        engine.stop()
    _report(figures, runs)


async def _measure(
    engine: Dockerd,
    registry: Registry,
    leader: InProcessLeader,
    env: dict[str, str],
    *,
    work: Path,
    runs: int,
) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"build": [], "local": [], "build+push": [], "registry": []}
    for i in range(runs):
        figures["build"].append(
            await _timed_cli(engine, env, fresh_context(work), f"plain:{i}", False)
        )
        figures["local"].append(await _timed_deploy(leader, fresh_context(work), "bench"))
    await leader.api.put_registry(registry.host, registry.username, registry.password)
    for i in range(runs):
        ref = f"{registry.host}/{registry.username}/plain:{i}"
        figures["build+push"].append(await _timed_cli(engine, env, fresh_context(work), ref, True))
        figures["registry"].append(await _timed_deploy(leader, fresh_context(work), "bench"))
    return figures


def _report(figures: dict[str, list[float]], runs: int) -> None:
    med = {name: statistics.median(values) for name, values in figures.items()}
    print(f"runs: {runs} (median seconds)")
    for name, value in med.items():
        print(f"  {name:<11} {value:6.2f} s")
    for agent, plain in (("local", "build"), ("registry", "build+push")):
        print(
            f"  {agent} / {plain}: ratio {med[agent] / med[plain]:.2f}, "
            f"added {med[agent] - med[plain]:+.2f} s"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    with asyncio.Runner(loop_factory=daemon_loop()) as runner:  # the leader's loop as deployed
        runner.run(main(parser.parse_args().runs))
