"""A separate build server: the leader builds and pushes through a second engine whose
socket a real sshd forwards, into a 0700 directory; an unreachable one fails the
deployment with its reason and the leader stays up."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.leader.pipeline.build_server import TUNNEL_PREFIX, tunnel_parent
from tests.support.contexts import busybox_context, run_step
from tests.support.dockerd import Dockerd
from tests.support.registry import Registry
from tests.support.sshd import Sshd

# tunnels may share the system's temporary directory: one process looks at it at a time
pytestmark = pytest.mark.xdist_group("build-server")


def _build_server(sshd: Sshd, engine: Dockerd) -> dict[str, Any]:
    return {
        "ssh": sshd.url,
        "known_hosts": str(sshd.known_hosts),
        "identity_file": str(sshd.identity),
        "docker_socket": str(engine.sock),
    }


@dataclass
class Rig:
    """A build server (an sshd forwarding a second engine's socket), a registry, and
    leaders that build there."""

    leader_factory: Callable[..., Any]
    sshd: Sshd
    builder: Dockerd
    registry: Registry

    def server(self) -> dict[str, Any]:
        return _build_server(self.sshd, self.builder)

    async def leader(self, server: dict[str, Any] | None = None, **leader: Any) -> Any:
        """A leader whose builds go to `server` (this rig's by default), with the
        registry's credentials set."""
        server = server or self.server()
        made = await self.leader_factory(leader={"build_server": server, **leader})
        await made.api.put_registry(
            self.registry.host, self.registry.username, self.registry.password
        )
        return made


@pytest.fixture
def short_state_dir() -> Iterator[Path]:
    """A state directory short enough for the tunnels' sockets to go in it: a test's own
    temporary directory is too deep, and the system's is shared with other processes."""
    path = Path(tempfile.mkdtemp(prefix="bs-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def rig(
    leader_factory: Callable[..., Any],
    sshd: Sshd,
    worker_engines: list[Dockerd],
    registry: Registry,
) -> Rig:
    return Rig(leader_factory, sshd, worker_engines[1], registry)


async def test_deployment_builds_on_the_build_server_and_pushes_from_there(
    leader_factory: Callable[..., Any],
    sshd: Sshd,
    worker_engines: list[Dockerd],
    dockerd: Dockerd,
    registry: Registry,
    tmp_path: Path,
    short_state_dir: Path,
) -> None:
    """The image is built by the second engine (not the leader's) and the registry serves it."""
    builder = worker_engines[1]
    leader = await leader_factory(
        state_dir=short_state_dir, leader={"build_server": _build_server(sshd, builder)}
    )
    _, cluster = await leader.api.request("GET", "/v1/cluster")
    assert cluster["mode"] == "registry" and "build server" in cluster["reason"]
    await leader.api.put_registry(registry.host, registry.username, registry.password)
    state_dir = tunnel_parent(Path(leader.config.state_dir))
    assert state_dir == short_state_dir  # this leader's tunnels only, not the shared /tmp
    dep = await leader.api.deploy_dir(
        busybox_context(tmp_path / "c", run_step("echo on-the-build-server; sleep 2")), "remote"
    )
    tunnel_modes = await _tunnel_modes_while_building(leader, dep["id"], state_dir)

    final = await leader.api.wait_final(dep["id"])
    await leader.api.wait_retention(dep["id"], count=2)  # its own tunnel, after the final state

    assert final["state"] == "succeeded", final.get("error")
    tag = f"{final['repository']}:{dep['id']}"
    assert builder.cli("image", "inspect", tag, check=False).returncode == 0
    assert dockerd.cli("image", "inspect", tag, check=False).returncode != 0
    assert registry.manifest_digest(f"{registry.username}/remote", dep["id"]) == final["digest"]
    assert tunnel_modes and all(mode == 0o700 for mode in tunnel_modes)
    assert not list(state_dir.glob(f"{TUNNEL_PREFIX}*"))  # each tunnel is gone after its stage


async def _tunnel_modes_while_building(leader: Any, dep_id: str, state_dir: Path) -> list[int]:
    async with asyncio.timeout(60):
        while True:
            tunnels = list(state_dir.glob(f"{TUNNEL_PREFIX}*"))
            if tunnels:
                return [stat.S_IMODE(t.stat().st_mode) for t in tunnels]
            _, doc = await leader.api.request("GET", f"/v1/deployments/{dep_id}")
            assert doc["state"] in ("queued", "building"), doc
            await asyncio.sleep(0.05)


async def test_unreachable_build_server_fails_the_deployment_not_the_leader(
    rig: Rig, tmp_path: Path
) -> None:
    """With the build server's sshd stopped, the build fails naming it; the leader serves on."""
    leader = await rig.leader()
    rig.sshd.cleanup()

    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "stranded")
    final = await leader.api.wait_final(dep["id"])

    assert final["state"] == "failed"
    assert final["error"]["code"] == "build_failed"
    assert (
        "build server" in final["error"]["message"] and "unreachable" in final["error"]["message"]
    )
    assert "SSH" in final["error"]["hint"]
    status, _ = await leader.api.request("GET", "/v1/cluster")
    assert status == 200


async def test_a_build_server_without_that_docker_socket_is_named_not_the_dockerfile(
    rig: Rig, tmp_path: Path
) -> None:
    """SSH works but the forwarded socket does not exist there: the failure names the build
    server's socket and points at SSH, not at the Dockerfile."""
    server = {**rig.server(), "docker_socket": "/nonexistent.sock"}
    leader = await rig.leader(server)

    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "socketless")
    final = await leader.api.wait_final(dep["id"])

    assert final["state"] == "failed"
    assert final["error"]["code"] == "build_failed"
    assert "does not serve its Docker socket /nonexistent.sock" in final["error"]["message"]
    assert "SSH" in final["error"]["hint"] and "Dockerfile" not in final["error"]["hint"]


async def test_a_push_whose_tunnel_cannot_open_is_retried_through_a_new_one(
    rig: Rig, tmp_path: Path
) -> None:
    """The build server's sshd goes away during the build and comes back 2 s into the
    push stage: the push is retried within its budget, each attempt through a tunnel of its
    own, and the deployment succeeds."""
    leader = await rig.leader()
    context = busybox_context(tmp_path / "c", run_step("sleep 2"))
    dep = await leader.api.deploy_dir(context, "retunnel")
    # Stopping sshd before the build's connection is up would fail the build, not the push.
    await _build_running_on(leader, dep["id"])
    rig.sshd.stop()  # the build's own connection goes on
    await leader.api.wait_state(dep["id"], "pushing")
    await asyncio.sleep(2)
    rig.sshd.start()

    final = await leader.api.wait_final(dep["id"])

    assert final["state"] == "succeeded", final.get("error")
    assert final["push_retries"] >= 1


async def test_a_push_the_build_server_refuses_is_not_retried(rig: Rig, tmp_path: Path) -> None:
    """The build server's host key changes during the build (known_hosts no longer
    holds it): the push fails at once as push_failed, naming the key, instead of being
    retried for the whole push budget against a host that refuses the same way."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(rig.sshd.known_hosts.read_text())
    server = {**rig.server(), "known_hosts": str(known_hosts)}
    leader = await rig.leader(server, push_retry_budget=30)
    context = busybox_context(tmp_path / "c", run_step("sleep 2"))
    dep = await leader.api.deploy_dir(context, "refused")
    await _build_running_on(leader, dep["id"])
    known_hosts.write_text(rig.sshd.impostor_known_hosts().read_text())
    changed_at = asyncio.get_running_loop().time()

    final = await leader.api.wait_final(dep["id"])

    assert final["error"]["code"] == "push_failed", final
    assert "host key" in final["error"]["message"]
    assert final["push_retries"] == 0
    assert asyncio.get_running_loop().time() - changed_at < 15  # the 2 s build, then at once


async def test_old_images_are_removed_on_the_build_server_too(rig: Rig, tmp_path: Path) -> None:
    """Every build leaves its image on the build server: retention removes those past
    keep_images there too, or they would fill its disk."""
    builder = rig.builder
    leader = await rig.leader(keep_images=1)
    finals = []
    for i in range(2):
        dep = await leader.api.deploy_dir(busybox_context(tmp_path / f"c{i}"), "piles")
        finals.append(await leader.api.wait_final(dep["id"]))
    assert [f["state"] for f in finals] == ["succeeded"] * 2
    await leader.api.wait_retention(finals[-1]["id"], count=2)  # here, and there

    held = builder.cli(
        "image", "ls", "--filter", "label=deploy-agent.app=piles", "--format", "{{.Tag}}"
    ).stdout.split()
    assert held == [finals[1]["id"]]


async def _build_running_on(leader: Any, dep_id: str) -> None:
    """Wait for the deployment's RUN step to run on the build server's engine (BuildKit
    says so in the build log; its steps are no containers for `docker ps` to list): the
    build's SSH connection is up from then on."""
    await leader.api.wait_state(dep_id, "building")
    async with asyncio.timeout(30):
        while True:
            events = await leader.leader.ctx.store.events_after(dep_id, 0, 10_000)
            if any(b'"status":"running"' in e and b"RUN" in e for e in events):
                return
            await asyncio.sleep(0.1)


def test_a_tunnel_goes_to_the_temporary_directory_when_its_socket_path_would_be_too_long() -> None:
    """Unix socket paths have a limit of 107 bytes: a deep state directory is not used."""
    assert tunnel_parent(Path("/var/lib/deploy-agent")) == Path("/var/lib/deploy-agent")
    deep = Path("/var/lib") / ("d" * 80)
    assert tunnel_parent(deep) == Path(tempfile.gettempdir())


async def test_build_server_without_registry_is_409(
    leader_factory: Callable[..., Any], sshd: Sshd, worker_engines: list[Dockerd], tmp_path: Path
) -> None:
    """A build server means the registry flow: without credentials the deployment is refused."""
    leader = await leader_factory(leader={"build_server": _build_server(sshd, worker_engines[1])})

    status, doc = await leader.api.deploy_dir_raw(busybox_context(tmp_path / "c"), "nowhere")

    assert status == 409
    assert doc["error"]["code"] == "registry_required"
    assert "build server" in doc["error"]["message"]


async def test_services_that_may_run_on_the_leader_get_an_image_built_elsewhere(
    rig: Rig, swarm_engine: Dockerd, short_state_dir: Path, tmp_path: Path
) -> None:
    """No worker enrolled: the services run on the leader's node, whose engine never
    saw the image (the build server built and pushed it). The leader pulls it there
    before the release, since the services carry no registry credentials for Swarm to
    pull with."""
    leader = await rig.leader_factory(
        state_dir=short_state_dir,
        engine={"url": swarm_engine.url},
        leader={"build_server": rig.server(), "stage_timeouts": {"releasing": 90}},
    )
    await leader.api.put_registry(rig.registry.host, rig.registry.username, rig.registry.password)
    services = [{"name": "web", "replicas": 1, "update": {"monitor_s": 1}}]
    context = busybox_context(tmp_path / "c", cmd="sleep 3600")
    dep = await leader.api.deploy_dir(context, "elsewhere", services=json.dumps(services))

    final = await leader.api.wait_final(dep["id"], timeout=110)

    assert final["state"] == "succeeded", final["error"]
    events = await leader.api.events(dep["id"])
    assert any(e.get("action") == "pulled_on_leader" for e in events)
    assert swarm_engine.cli("image", "inspect", final["image"], check=False).returncode == 0
