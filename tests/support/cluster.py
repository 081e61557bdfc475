"""A leader with a registry and worker agents enrolled: the setup registry-mode tests share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.support.dockerd import Dockerd
from tests.support.leader import InProcessLeader, LeaderProcess
from tests.support.registry import Registry
from tests.support.worker import WorkerProcess


async def start_cluster(
    leader: InProcessLeader | LeaderProcess,
    registry: Registry,
    engines: list[Dockerd] | list[str],
    worker_process: Callable[..., WorkerProcess],
    **worker: Any,
) -> list[WorkerProcess]:
    """Set the registry, enrol one worker per engine, and wait until each is connected."""
    status, _ = await leader.api.put_registry(registry.host, registry.username, registry.password)
    assert status == 200
    token = await leader.api.join_token()
    workers = [
        worker_process(f"w{i}", engine, leader.api.base_url, token, **worker).start()
        for i, engine in enumerate(engines, start=1)
    ]
    await leader.api.wait_nodes(**{w.name: True for w in workers})
    return workers
