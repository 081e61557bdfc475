"""Time the release stage next to `docker service update --image` doing the same update.

    python -m bench.release --runs 5

Starts its own single-node Swarm. Each run builds a fresh image and releases it to a
two-replica service through the leader (local mode), then updates a twin service with
the docker CLI to another fresh image, with the same update settings (start-first,
1 s monitor), waiting for convergence (`--detach=false`). Medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import docker, fresh_context
from bench.scratch import scratch_dir
from tests.support.dockerd import Dockerd
from tests.support.leader import InProcessLeader, leader_config

COMMAND = ["/bin/busybox", "sh", "-c", "trap 'exit 0' TERM; /bin/busybox sleep 3600 & wait"]
SERVICES = [{"name": "web", "command": COMMAND, "replicas": 2, "update": {"monitor_s": 1}}]


async def main(runs: int) -> None:
    with scratch_dir("bench-release-") as work:
        await _main(runs, work)


async def _main(runs: int, work: Path) -> None:
    engine = Dockerd()
    engine.start()
    env = {**os.environ, "DOCKER_CONFIG": str(work / "docker-config"), "DOCKER_BUILDKIT": "0"}
    engine.init_swarm()
    leader = InProcessLeader(leader_config(work / "state", engine.url))
    await leader.start()
    try:
        agent, plain = await _measure(leader, engine, env, work, runs)
    finally:
        await leader.stop()
        engine.leave_swarm()
        engine.stop()
    a, p = statistics.median(agent), statistics.median(plain)
    print(f"runs: {runs}, 2 replicas, start-first, 1 s monitor (median seconds)")
    print(f"  agent releasing stage:                 {a:.2f} s")
    print(f"  docker service update --image (waits): {p:.2f} s")
    print(f"  ratio {a / p:.2f}, added {a - p:+.2f} s")


async def _measure(
    leader: InProcessLeader, engine: Dockerd, env: dict[str, str], work: Path, runs: int
) -> tuple[list[float], list[float]]:
    first = await _release(leader, work)
    docker(
        engine,
        env,
        "service",
        "create",
        "--name",
        "twin",
        "--replicas",
        "2",
        "--update-order",
        "start-first",
        "--update-monitor",
        "1s",
        "--detach=false",
        first["image"],
        *COMMAND,
    )
    agent, plain = [], []
    for i in range(runs):
        agent.append((await _release(leader, work))["stages"]["releasing"]["seconds"])
        tag = f"twin:{i}"
        docker(engine, env, "build", "-q", "-t", tag, str(fresh_context(work)))
        started = time.perf_counter()
        await asyncio.to_thread(
            docker, engine, env, "service", "update", "--image", tag, "--detach=false", "twin"
        )
        plain.append(time.perf_counter() - started)
    return agent, plain


async def _release(leader: InProcessLeader, work: Path) -> dict[str, Any]:
    dep = await leader.api.deploy_dir(fresh_context(work), "bench", services=json.dumps(SERVICES))
    final = await leader.api.wait_final(dep["id"], timeout=120)
    assert final["state"] == "succeeded", final
    return final


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(main(parser.parse_args().runs))
