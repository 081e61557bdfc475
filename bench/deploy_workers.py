"""Time a deployment to two workers next to a shell script of docker CLI calls doing the same.

    python -m bench.deploy_workers --runs 7

Starts a registry with a login, three Docker Engines (leader, two workers), a leader
(`deploy-agent run`, TLS) and two worker agents, all as processes. Each run deploys a
fresh context (a unique file ahead of the RUN step defeats every cache) through the
leader in registry mode until the deployment is final, and, in turn, runs the script a
person would write: `docker build`, `docker push`, then `docker pull` on both worker
engines at once (`&` and `wait`). One warm-up of each is not counted. Medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import docker_login, fresh_context
from tests.support.api import tar_of
from tests.support.dockerd import Dockerd
from tests.support.leader import LeaderProcess, leader_config
from tests.support.registry import Registry
from tests.support.worker import WorkerProcess

SCRIPT = """set -euo pipefail
docker -H "$LEADER_ENGINE" build -q -t "$REF" "$CONTEXT" >/dev/null
docker -H "$LEADER_ENGINE" push -q "$REF" >/dev/null
docker -H "$WORKER1_ENGINE" pull -q "$REF" >/dev/null & first=$!
docker -H "$WORKER2_ENGINE" pull -q "$REF" >/dev/null & second=$!
wait "$first"
wait "$second"
"""
STAGES = ("building", "pushing", "distributing")


class Cluster:
    """Registry, engines, leader and workers of the benchmark, and their clean-up."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.engines = [Dockerd(), Dockerd(), Dockerd()]
        self.registry = Registry()
        self.leader = LeaderProcess(
            leader_config(work / "state", self.engines[0].url, leader={"plain_http": None}),
            work,
        )
        self.workers: list[WorkerProcess] = []
        self.env = {
            **os.environ,
            "DOCKER_CONFIG": str(work / "docker-config"),
            "DOCKER_BUILDKIT": "0",
            "LEADER_ENGINE": self.engines[0].url,
            "WORKER1_ENGINE": self.engines[1].url,
            "WORKER2_ENGINE": self.engines[2].url,
        }

    async def start(self) -> None:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(Dockerd.start, self.engines))
        self.registry.start()
        self.leader.start()
        api = self.leader.api
        await api.put_registry(self.registry.host, self.registry.username, self.registry.password)
        token = await api.join_token()
        for i, engine in enumerate(self.engines[1:], start=1):
            (self.work / f"w{i}").mkdir()
            self.workers.append(
                WorkerProcess(
                    self.work / f"w{i}",
                    name=f"w{i}",
                    engine_url=engine.url,
                    leader_url=api.base_url,
                    token=token,
                ).start()
            )
        await api.wait_nodes(w1=True, w2=True)
        docker_login(self.engines[0], self.env, self.registry)

    async def stop(self) -> None:
        for worker in self.workers:
            worker.terminate()
        if self.leader.proc is not None:
            self.leader.terminate()
        await self.leader.api.close()
        self.registry.cleanup()
        for engine in self.engines:
            engine.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    async def deploy(self) -> tuple[float, dict[str, Any]]:
        """Submit as the docker CLI sends a context (plain tar); wait for the final state."""
        ctx = fresh_context(self.work)
        started = time.perf_counter()
        status, dep = await self.leader.api.request(
            "POST",
            "/v1/deployments",
            params={"app": "bench"},
            data=tar_of(ctx, gzip=False),
            headers={"Content-Type": "application/x-tar"},
        )
        assert status == 202, dep
        final = await self.leader.api.wait_final(dep["id"])
        elapsed = time.perf_counter() - started
        assert final["state"] == "succeeded", final
        assert {n: r["status"] for n, r in final["nodes"].items()} == {
            "w1": "present",
            "w2": "present",
        }, final
        return elapsed, final

    async def script(self, i: int) -> float:
        ref = f"{self.registry.host}/{self.registry.username}/plain:{i}"
        env = {**self.env, "REF": ref, "CONTEXT": str(fresh_context(self.work))}
        started = time.perf_counter()
        done = await asyncio.to_thread(
            subprocess.run, ["bash", "-c", SCRIPT], env=env, capture_output=True, timeout=300
        )
        elapsed = time.perf_counter() - started
        assert done.returncode == 0, done.stderr
        for engine in self.engines[1:]:
            engine.cli("image", "inspect", ref)  # the script really left it on each worker
        return elapsed


async def main(runs: int) -> None:
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="bench-workers-")))
    try:
        await cluster.start()
        await cluster.deploy()  # warm-up: the busybox layer reaches registry and workers
        await cluster.script(0)
        agent, plain, stages = [], [], []
        for i in range(1, runs + 1):
            seconds, final = await cluster.deploy()
            agent.append(seconds)
            stages.append(final["stages"])
            plain.append(await cluster.script(i))
    finally:
        await cluster.stop()
    _report(agent, plain, stages, runs)


def _report(
    agent: list[float], plain: list[float], stages: list[dict[str, Any]], runs: int
) -> None:
    a, p = statistics.median(agent), statistics.median(plain)
    print(f"runs: {runs}, 2 workers, registry mode (median seconds)")
    print(f"  agent: submit -> final (built, pushed, both pulled): {a:.2f} s")
    for stage in STAGES:
        print(f"    {stage:<12} {statistics.median(s[stage]['seconds'] for s in stages):.2f} s")
    print(f"  script: build, push, pull on both (& and wait):     {p:.2f} s")
    print(f"  ratio {a / p:.2f}, added {a - p:+.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    asyncio.run(main(parser.parse_args().runs))
