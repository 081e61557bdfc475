"""One cluster of simulated hosts for the whole package; every test leaves it healed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.cluster.harness import WORKERS, Cluster, measured
from tests.support.api import Api


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    built = Cluster(tmp_path_factory.mktemp("cluster"), WORKERS)
    try:
        started = time.monotonic()
        built.start()
        measured({"cluster_start_s": round(time.monotonic() - started, 2)})
        yield built
    finally:
        built.close()


@pytest.fixture
async def api(cluster: Cluster) -> AsyncIterator[Api]:
    """A client of the leader; after the test, every fault is undone and every worker is
    connected again before the next test starts."""
    client = cluster.new_api()
    try:
        yield client
    finally:
        await client.close()
        await asyncio.to_thread(cluster.heal)
        healed = cluster.new_api()
        try:
            await healed.wait_nodes(60, **dict.fromkeys(WORKERS, True))
        finally:
            await healed.close()
