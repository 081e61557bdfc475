"""Time from push done to every worker holding the image, next to `docker pull` alone.

    python -m bench.distribution --runs 5

Starts a registry with a login, a leader (TLS), and two worker agents as processes,
each worker with its own Docker Engine. Each run deploys a fresh image (a unique file
defeats every cache) and reads the distributing stage's duration; then pushes another
fresh image with the docker CLI and times `docker pull` on both engines at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import docker, docker_login, fresh_context
from bench.scratch import scratch_dir
from tests.support.dockerd import Dockerd
from tests.support.leader import InProcessLeader, leader_config
from tests.support.registry import Registry
from tests.support.worker import WorkerProcess


async def main(runs: int) -> None:
    with scratch_dir("bench-dist-") as work:
        await _main(runs, work)


async def _main(runs: int, work: Path) -> None:
    engines = [Dockerd(), Dockerd(), Dockerd()]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(Dockerd.start, engines))
    registry = Registry()
    registry.start()
    leader = InProcessLeader(
        leader_config(work / "state", engines[0].url, leader={"plain_http": None})
    )
    await leader.start()
    workers: list[WorkerProcess] = []
    try:
        await leader.api.put_registry(registry.host, registry.username, registry.password)
        token = await leader.api.join_token()
        for i, engine in enumerate(engines[1:], start=1):
            (work / f"w{i}").mkdir()
            workers.append(
                WorkerProcess(
                    work / f"w{i}",
                    name=f"w{i}",
                    engine_url=engine.url,
                    leader_url=leader.url,
                    token=token,
                ).start()
            )
        await leader.api.wait_nodes(w1=True, w2=True)
        agent, plain = await _measure(leader, registry, engines, work, runs)
    finally:
        for worker in workers:
            worker.terminate()
        await leader.stop()
        registry.cleanup()
        for engine in engines:
            engine.stop()
    a, p = statistics.median(agent), statistics.median(plain)
    print(f"runs: {runs}, 2 workers (median seconds)")
    print(f"  push done -> both workers hold it (agent): {a:.2f} s")
    print(f"  docker pull on both engines at once:       {p:.2f} s")
    print(f"  ratio {a / p:.2f}, added {a - p:+.2f} s")


async def _measure(
    leader: InProcessLeader, registry: Registry, engines: list[Dockerd], work: Path, runs: int
) -> tuple[list[float], list[float]]:
    env = {**os.environ, "DOCKER_CONFIG": str(work / "docker-config"), "DOCKER_BUILDKIT": "0"}
    for engine in engines:
        docker_login(engine, env, registry)
    agent, plain = [], []
    for i in range(runs):
        dep = await leader.api.deploy_dir(fresh_context(work), "bench")
        final = await leader.api.wait_final(dep["id"])
        assert final["state"] == "succeeded", final
        agent.append(final["stages"]["distributing"]["seconds"])
        ref = f"{registry.host}/{registry.username}/plain:{i}"
        docker(engines[0], env, "build", "-q", "-t", ref, str(fresh_context(work)))
        docker(engines[0], env, "push", "-q", ref)
        started = time.perf_counter()
        await asyncio.gather(
            *(asyncio.to_thread(docker, e, env, "pull", "-q", ref) for e in engines[1:])
        )
        plain.append(time.perf_counter() - started)
    return agent, plain


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(main(parser.parse_args().runs))
