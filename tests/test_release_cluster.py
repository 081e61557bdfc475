"""Release across two simulated hosts: a manager and a worker, each a network namespace
with its own Docker Engine, joined in one Swarm; the registry is served over TLS with
the test's own CA. The worker agent pre-pulls the digest, and the service's tasks run
on the worker only."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agent.tls import ensure_leader_tls
from tests.support.contexts import busybox_context
from tests.support.dockerd import Dockerd
from tests.support.netns import Hosts
from tests.support.registry import Registry
from tests.support.worker import WorkerProcess

SERVICE = ["/bin/busybox", "sh", "-c", "trap 'exit 0' TERM; /bin/busybox sleep 3600 & wait"]


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.hosts = Hosts(["mgr", "wkr"])
        self.manager = Dockerd(prefix=self.hosts.nsenter("mgr"))
        self.worker = Dockerd(prefix=self.hosts.nsenter("wkr"))
        self.tls = ensure_leader_tls(tmp / "registry-ca", [self.hosts.address("mgr")])
        self.registry = Registry(
            address=self.hosts.address("mgr"),
            tls=(self.tls.cert_file, self.tls.key_file),
            prefix=self.hosts.nsenter("mgr"),
        )
        self.certs_dir = Path("/etc/docker/certs.d") / self.registry.host

    def start(self) -> None:
        self.hosts.open()
        self.certs_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.tls.ca_file, self.certs_dir / "ca.crt")
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(Dockerd.start, [self.manager, self.worker]))
        self.registry.start()
        address = self.hosts.address("mgr")
        self.manager.cli(
            "swarm", "init", "--advertise-addr", address, "--listen-addr", f"{address}:2377"
        )
        token = self.manager.cli("swarm", "join-token", "-q", "worker").stdout.strip()
        self.worker.cli("swarm", "join", "--token", token, f"{address}:2377")

    def node_id(self, engine: Dockerd) -> str:
        return engine.cli("info", "--format", "{{.Swarm.NodeID}}").stdout.strip()

    def close(self) -> None:
        for engine in (self.worker, self.manager):
            engine.leave_swarm()
        self.registry.cleanup()
        for engine in (self.worker, self.manager):
            engine.stop()
        shutil.rmtree(self.certs_dir, ignore_errors=True)
        self.hosts.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    built = Cluster(tmp_path)
    try:
        built.start()
        yield built
    finally:
        built.close()


async def test_tasks_run_on_the_worker_from_the_digest_it_pre_pulled(
    cluster: Cluster,
    leader_factory: Callable[..., Any],
    worker_process: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    """With a worker enrolled, both replicas run on the worker node, none on the manager."""
    leader = await leader_factory(
        engine={"url": cluster.manager.url},
        leader={"plain_http": None, "stage_timeouts": {"releasing": 90}},
    )
    reg = cluster.registry
    status, doc = await leader.api.put_registry(reg.host, reg.username, reg.password)
    assert status == 200, doc
    token = await leader.api.join_token()
    worker_process("wkr", cluster.worker, leader.url, token).start()
    await leader.api.wait_nodes(wkr=True)
    services = [{"name": "web", "command": SERVICE, "replicas": 2, "update": {"monitor_s": 1}}]

    dep = await leader.api.deploy_dir(
        busybox_context(tmp_path / "c"), "spread", services=json.dumps(services)
    )
    final = await leader.api.wait_final(dep["id"], timeout=110)

    assert final["state"] == "succeeded", final
    assert final["nodes"]["wkr"]["status"] == "present"
    events = await leader.api.events(dep["id"])
    released_at = next(e["at"] for e in events if e.get("state") == "releasing")
    pulled_at = next(e["at"] for e in events if e["type"] == "distribution" and "nodes" in e)
    assert pulled_at <= released_at
    running = cluster.manager.cli(
        "node",
        "ps",
        cluster.node_id(cluster.worker),
        "--filter",
        "desired-state=running",
        "--format",
        "{{.Name}} {{.Image}} {{.CurrentState}}",
    ).stdout.splitlines()
    on_manager = cluster.manager.cli(
        "node",
        "ps",
        cluster.node_id(cluster.manager),
        "--filter",
        "desired-state=running",
        "--format",
        "{{.Name}}",
    ).stdout.split()
    assert len([line for line in running if line.startswith("spread_web.")]) == 2
    assert all(final["image"] in line and "Running" in line for line in running)
    assert on_manager == []
    digests = cluster.worker.cli(
        "image", "inspect", final["image"], "--format", "{{json .RepoDigests}}"
    ).stdout
    assert final["digest"] in digests
