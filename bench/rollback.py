"""Time `deploy-agent rollback` next to `docker service update --image` doing the same.

    python -m bench.rollback --runs 7

Swarm: a single-node Swarm, a leader process (`deploy-agent run`, TLS, local mode), a
two-replica service (start-first, 1 s monitor) released as v1 then v2. Each run rolls
the app back with `deploy-agent rollback APP` (which goes back and forth between v1 and
v2: the release before the current one) and, in turn, updates a twin service with the
same settings to the other image with `docker service update --image IMAGE
--detach=false`. Counted: the rollback's submit to final (its record's times), the CLI's
whole run (process start to exit, its start-up included), the docker CLI's whole run.

Workers: registry mode, two worker engines with their agents; v1 and v2 deployed (no
services), then rollbacks back and forth: the `distributing` stage of each, with both
workers holding both images. Medians of all runs, one run of the script.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import docker, fresh_context
from bench.scratch import scratch_dir
from tests.support.cluster import start_cluster
from tests.support.dockerd import Dockerd
from tests.support.leader import LeaderProcess, leader_config
from tests.support.registry import Registry
from tests.support.worker import WorkerProcess

COMMAND = ["/bin/busybox", "sh", "-c", "trap 'exit 0' TERM; /bin/busybox sleep 3600 & wait"]
SERVICES = [{"name": "web", "command": COMMAND, "replicas": 2, "update": {"monitor_s": 1}}]
SCRIPT = str(Path(sys.executable).parent / "deploy-agent")
TLS = {"plain_http": None}


async def main(runs: int) -> None:
    with scratch_dir("bench-rollback-") as work:
        swarm = await _swarm_figures(runs, work / "swarm")
        distributing = await _worker_figures(runs, work / "workers")
    finals, cli, plain = swarm
    agent = [f["finished_at"] - f["created_at"] for f in finals]
    a, c, p = (statistics.median(x) for x in (agent, cli, plain))
    print(f"runs: {runs}, 2 replicas, start-first, 1 s monitor (median seconds)")
    print(f"  deploy-agent rollback, submit -> final:    {a:.2f} s")
    print(f"  deploy-agent rollback, whole CLI run:      {c:.2f} s")
    print(f"  docker service update --image (waits):    {p:.2f} s")
    print(f"  ratio {a / p:.2f} (submit -> final), {c / p:.2f} (whole CLI run)")
    print(f"  stages seen in the rollbacks: {sorted({s for f in finals for s in f['stages']})}")
    _print_breakdown(finals)
    for name, values in (("submit -> final", agent), ("docker", plain), ("CLI run", cli)):
        print(f"  each, {name}: {', '.join(f'{v:.2f}' for v in values)} s")
    d = statistics.median(distributing)
    print(f"registry mode, two workers holding the image: distributing {d * 1000:.0f} ms")
    print(f"  (each: {', '.join(f'{s * 1000:.0f}' for s in distributing)} ms)")


def _print_breakdown(finals: list[dict[str, Any]]) -> None:
    """Where a rollback's time went: before its release stage, in it, after it."""
    parts: dict[str, list[float]] = {"before releasing": [], "releasing": [], "after releasing": []}
    for final in finals:
        timing = final["stages"]["releasing"]
        parts["before releasing"].append(timing["started_at"] - final["created_at"])
        parts["releasing"].append(timing["seconds"])
        parts["after releasing"].append(final["finished_at"] - timing["finished_at"])
    medians = ", ".join(f"{name} {statistics.median(v):.3f} s" for name, v in parts.items())
    print(f"  medians: {medians}")


async def _swarm_figures(
    runs: int, work: Path
) -> tuple[list[dict[str, Any]], list[float], list[float]]:
    await asyncio.to_thread(work.mkdir)
    engine = Dockerd()
    engine.start()
    engine.init_swarm()
    leader = LeaderProcess(leader_config(work / "state", engine.url, leader=TLS), work)
    leader.start()
    env = {**os.environ, "DOCKER_CONFIG": str(work / "docker-config"), "DOCKER_BUILDKIT": "0"}
    try:
        return await _measure_swarm(leader, engine, env, work, runs)
    finally:
        leader.terminate()
        await leader.api.close()
        engine.leave_swarm()
        engine.stop()


async def _measure_swarm(
    leader: LeaderProcess, engine: Dockerd, env: dict[str, str], work: Path, runs: int
) -> tuple[list[dict[str, Any]], list[float], list[float]]:
    v1 = await _deploy(leader, work, services=SERVICES)
    v2 = await _deploy(leader, work, services=SERVICES)
    images = [v1["image"], v2["image"]]
    _twin(engine, env, images)
    finals, cli, plain = [], [], []
    for i in range(runs):
        final, wall = await _cli_rollback(leader)
        finals.append(final)
        cli.append(wall)
        started = time.perf_counter()
        await asyncio.to_thread(
            docker, engine, env, "service", "update", "--image", images[i % 2], "--detach=false",
            "twin",
        )  # fmt: skip
        plain.append(time.perf_counter() - started)
    return finals, cli, plain


def _twin(engine: Dockerd, env: dict[str, str], images: list[str]) -> None:
    """The twin service, on v1 then v2 like the app, so each run has an update to do."""
    settings = ["--replicas", "2", "--update-order", "start-first", "--update-monitor", "1s"]
    docker(engine, env, "service", "create", "--name", "twin", *settings, "--detach=false",
           images[0], *COMMAND)  # fmt: skip
    docker(engine, env, "service", "update", "--image", images[1], "--detach=false", "twin")


async def _cli_rollback(leader: LeaderProcess) -> tuple[dict[str, Any], float]:
    """`deploy-agent rollback bench`, run to its end: the final record, and how long the
    process ran."""
    env = {
        **os.environ,
        "DEPLOY_AGENT_URL": leader.api.base_url,
        "DEPLOY_AGENT_TOKEN": leader.token,
        "DEPLOY_AGENT_CA": str(Path(leader.raw["state_dir"]) / "tls" / "ca.pem"),
    }
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        SCRIPT, "rollback", "bench", env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    wall = time.perf_counter() - started
    assert proc.returncode == 0, (out.decode(), err.decode())
    dep_id = err.decode().split()[1]  # "deployment ID submitted (…)"
    _, final = await leader.api.request("GET", f"/v1/deployments/{dep_id}")
    return final, wall


async def _deploy(
    leader: LeaderProcess, work: Path, services: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    params = {"services": json.dumps(services)} if services else {}
    dep = await leader.api.deploy_dir(fresh_context(work), "bench", **params)
    final = await leader.api.wait_final(dep["id"], timeout=120)
    assert final["state"] == "succeeded", final
    return final


async def _worker_figures(runs: int, work: Path) -> list[float]:
    await asyncio.to_thread(work.mkdir)
    engines = [Dockerd(), Dockerd(), Dockerd()]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(Dockerd.start, engines))
    registry = Registry()
    registry.start()
    leader = LeaderProcess(leader_config(work / "state", engines[0].url, leader=TLS), work)
    workers: list[WorkerProcess] = []
    try:
        leader.start()
        workers = await start_cluster(leader, registry, engines[1:], _worker_factory(work))
        return await _measure_distribution(leader, work, runs)
    finally:
        for worker in workers:
            worker.terminate()
        leader.terminate()
        await leader.api.close()
        registry.cleanup()
        for engine in engines:
            engine.stop()


def _worker_factory(work: Path) -> Any:
    def make(name: str, engine: Dockerd, url: str, token: str) -> WorkerProcess:
        (work / name).mkdir()
        return WorkerProcess(work / name, name=name, engine_url=engine.url, leader_url=url,
                             token=token)  # fmt: skip

    return make


async def _measure_distribution(leader: LeaderProcess, work: Path, runs: int) -> list[float]:
    for _ in range(2):
        await _deploy(leader, work)
    seconds = []
    for _ in range(runs):
        status, doc = await leader.api.request("POST", "/v1/apps/bench/rollback")
        assert status == 202, doc
        final = await leader.api.wait_final(doc["id"])
        assert final["state"] == "succeeded", final
        assert {r["status"] for r in final["nodes"].values()} == {"present"}, final
        seconds.append(final["stages"]["distributing"]["seconds"])
    return seconds


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    asyncio.run(main(parser.parse_args().runs))
