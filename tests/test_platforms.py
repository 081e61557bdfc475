"""Platforms: an image is built for the workers' architecture, and never reaches a
worker that cannot run it.

The workers' engines are real (amd64) engines behind a proxy that makes them report
arm64, as an arm64 worker's engine would; everything the leader does with that report
(the build platform, the checks) is its production path.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import start_cluster
from tests.support.contexts import busybox_context
from tests.support.dockerd import Dockerd
from tests.support.engine_proxy import altered
from tests.support.leader import InProcessLeader
from tests.support.registry import Registry
from tests.support.worker import WorkerProcess

LeaderFactory = Callable[..., Any]
WorkerFactory = Callable[..., WorkerProcess]
AARCH64 = 183  # ELF e_machine
TLS = {"plain_http": None}  # workers join over TLS only


@pytest.fixture
async def leader(leader_factory: LeaderFactory) -> InProcessLeader:
    result: InProcessLeader = await leader_factory(leader=TLS)
    return result


@pytest.fixture
async def arm64_engine(worker_engines: list[Dockerd]) -> AsyncIterator[str]:
    """A worker engine that reports itself as arm64."""
    async with altered(worker_engines[0].sock, arch="arm64") as url:
        yield url


def _arm64_program(path: Path) -> None:
    """An ELF header for an aarch64 executable: an amd64 kernel without emulation
    refuses to run it ("exec format error"), as it would a real arm64 program."""
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 2, AARCH64, 1, 0x400000, 64, 0, 0, 64, 56, 0, 0, 0, 0)
    path.write_bytes(header)
    path.chmod(0o755)


async def test_the_image_is_built_for_the_workers_architecture_and_reaches_them(
    leader: InProcessLeader,
    registry: Registry,
    arm64_engine: str,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    tmp_path: Path,
) -> None:
    """The only worker runs arm64: the build is for linux/arm64, the image says so, and
    the worker holds it."""
    await start_cluster(leader, registry, [arm64_engine], worker_process)
    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "armed")
    final = await leader.api.wait_final(dep["id"])
    events = await leader.api.events(dep["id"])

    assert final["state"] == "succeeded", final["error"]
    assert final["platform"] == "linux/arm64"
    (build,) = [e for e in events if e["type"] == "build"]
    assert build["platform"] == "linux/arm64"
    assert final["nodes"]["w1"]["status"] == "present"
    arch = worker_engines[0].cli("image", "inspect", "-f", "{{.Architecture}}", final["image"])
    assert arch.stdout.strip() == "arm64"


async def test_an_engine_that_cannot_run_the_workers_programs_fails_with_platform_mismatch(
    leader: InProcessLeader,
    registry: Registry,
    arm64_engine: str,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    tmp_path: Path,
) -> None:
    """A RUN step of an arm64 program on an engine without emulation: platform_mismatch,
    naming the worker and its architecture, with the emulation hint; nothing is pushed
    or pulled."""
    context = tmp_path / "c"
    busybox_context(context, "COPY prog /prog", 'RUN ["/prog"]')
    _arm64_program(context / "prog")
    await start_cluster(leader, registry, [arm64_engine], worker_process)
    dep = await leader.api.deploy_dir(context, "foreign")
    final = await leader.api.wait_final(dep["id"])

    assert final["state"] == "failed"
    assert final["error"]["code"] == "platform_mismatch"
    assert "w1 (arm64)" in final["error"]["message"]
    assert "emulation" in final["error"]["hint"]
    assert final["digest"] is None and final["nodes"] == {}


async def test_an_image_of_another_platform_is_stopped_before_distribution(
    leader_factory: LeaderFactory,
    dockerd: Dockerd,
    registry: Registry,
    arm64_engine: str,
    worker_process: WorkerFactory,
    tmp_path: Path,
) -> None:
    """A build engine that ignores the platform it is asked for builds amd64: the leader
    finds it out from the image itself and fails with platform_mismatch, naming the
    worker, before anything is pushed or pulled."""
    async with altered(dockerd.sock, drop_params=frozenset({"platform"})) as deaf:
        leader = await leader_factory(engine={"url": deaf}, leader=TLS)
        await start_cluster(leader, registry, [arm64_engine], worker_process)
        dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "deaf")
        final = await leader.api.wait_final(dep["id"])

    assert final["error"]["code"] == "platform_mismatch", final["error"]
    assert "linux/amd64" in final["error"]["message"]
    assert "w1 (arm64)" in final["error"]["message"]
    assert final["digest"] is None and final["nodes"] == {}


async def test_workers_of_two_architectures_fail_before_anything_is_built(
    leader: InProcessLeader,
    registry: Registry,
    arm64_engine: str,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    tmp_path: Path,
) -> None:
    """One amd64 and one arm64 worker cannot share one image: platform_mismatch naming
    both, and no build starts."""
    await start_cluster(leader, registry, [worker_engines[1].url, arm64_engine], worker_process)
    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "mixed")
    final = await leader.api.wait_final(dep["id"])
    events = await leader.api.events(dep["id"])

    assert final["error"]["code"] == "platform_mismatch"
    assert "w1 (amd64)" in final["error"]["message"]
    assert "w2 (arm64)" in final["error"]["message"]
    assert not [e for e in events if e["type"] in ("build", "step")]
