"""Load: 60 deployments of 8 apps submitted at once to a leader process with two real
workers in registry mode. Each reaches exactly one final state, and the leader's memory
afterwards is within 5 % of what it was before.

The contexts are a Dockerfile on top of a busybox base image the engine already holds, so
the run measures the leader's scheduling and bookkeeping rather than 2 MiB uploads. Before
the "before" figure, the leader takes a burst of as many uploads as the run (refused once
received) and one deployment per app: the figure then includes what any burst of
connections costs, and a leak shows as growth beyond it.

Both figures are taken with the test's keep-alive connections closed and after the
leader's periodic heap trim: an idle TLS connection keeps buffers as large as the largest
response it carried (the run's list polls are about 45 KiB each), and glibc keeps freed
memory until trimmed. Neither is a leak, and either would hide one.

DEPLOY_AGENT_LOAD sets the number of deployments (default 60; 200 and 1000 are the long modes).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.api import Api, tar_of
from tests.support.cluster import start_cluster
from tests.support.contexts import busybox_context
from tests.support.dockerd import Dockerd
from tests.support.leader import LeaderProcess
from tests.support.load import FINAL, submit, wait_all_final
from tests.support.load import status_kib as rss_kib
from tests.support.registry import Registry
from tests.support.worker import WorkerProcess

LOAD = int(os.environ.get("DEPLOY_AGENT_LOAD", "60"))
APPS = [f"load{i}" for i in range(8)]
TRIM_INTERVAL_S = 2.0


def _stage_means(deployments: list[dict[str, Any]]) -> str:
    names = sorted({name for d in deployments for name in d["stages"]})
    means = {
        name: statistics.mean(d["stages"][name]["seconds"] for d in deployments) for name in names
    }
    return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in means.items())


async def _final_events(api: Api, dep_id: str, limit: asyncio.Semaphore) -> list[str]:
    async with limit:
        events = await api.events(dep_id)
    return [e["state"] for e in events if e["type"] == "state" and e["state"] in FINAL]


def _app_contexts(engine: Dockerd, root: Path) -> dict[str, bytes]:
    """One tiny context per app, each FROM a busybox base image built once."""
    base = f"load-base:{uuid.uuid4().hex[:8]}"
    engine.cli("build", "-t", base, str(busybox_context(root / "base")))
    bodies = {}
    for app in APPS:
        context = root / app
        context.mkdir()
        (context / "Dockerfile").write_text(f'FROM {base}\nCMD ["/bin/busybox", "echo", "{app}"]\n')
        bodies[app] = tar_of(context)
    return bodies


async def _burst_of_refused_uploads(api: Api, body: bytes) -> None:
    """LOAD uploads at once that the leader reads in full, then refuses (no such Dockerfile)."""

    async def refused() -> None:
        status, _ = await api.request(
            "POST",
            "/v1/deployments",
            params={"app": APPS[0], "dockerfile": "missing"},
            data=body,
            headers={"Content-Type": "application/gzip"},
        )
        assert status == 400

    await asyncio.gather(*(refused() for _ in range(LOAD)))


async def _settled_rss(pid: int, api: Api) -> int:
    """RSS once the client's connections are closed and the leader has trimmed its heap."""
    await api.drop_connections()
    await asyncio.sleep(TRIM_INTERVAL_S * 2 + 1)
    return rss_kib(pid)


@pytest.mark.timeout(300 + LOAD)
async def test_many_deployments_at_once_all_finish_and_memory_returns(
    leader_process: Callable[..., LeaderProcess],
    registry: Registry,
    dockerd: Dockerd,
    worker_engines: list[Dockerd],
    worker_process: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    """LOAD deployments at once: each ends exactly once, succeeded; RSS within 5 %."""
    leader = leader_process(
        leader={
            "plain_http": None,
            "max_parallel_builds": len(APPS),
            "memory_trim_interval": TRIM_INTERVAL_S,
        }
    )
    leader.start()
    assert leader.proc is not None
    await start_cluster(leader, registry, worker_engines, worker_process)
    bodies = _app_contexts(dockerd, tmp_path)
    api = leader.api
    baseline = rss_kib(leader.proc.pid)
    await _burst_of_refused_uploads(api, bodies[APPS[0]])
    warm = {await submit(api, app, body) for app, body in bodies.items()}
    await wait_all_final(api, APPS, warm, 120)
    before = await _settled_rss(leader.proc.pid, api)

    started = time.monotonic()
    ids = await asyncio.gather(
        *(submit(api, APPS[i % len(APPS)], bodies[APPS[i % len(APPS)]]) for i in range(LOAD))
    )
    done = await wait_all_final(api, APPS, set(ids), 120 + LOAD)
    elapsed = time.monotonic() - started
    limit = asyncio.Semaphore(16)
    finals = await asyncio.gather(*(_final_events(api, dep_id, limit) for dep_id in ids))
    after = await _settled_rss(leader.proc.pid, api)

    print(f"load: {LOAD} deployments in {elapsed:.1f} s, leader rss {baseline} KiB at start,")
    print(f"load: {before} KiB before the run, {after} KiB after")
    print(f"load: mean stage times: {_stage_means(list(done.values()))}")
    assert len(set(ids)) == LOAD
    assert {d["state"] for d in done.values()} == {"succeeded"}, done
    assert [f for f in finals if f != ["succeeded"]] == []
    assert after <= before * 1.05, (before, after)
