"""Rolling agent upgrades: `deploy-agent upgrade` takes real worker processes from one
release to another over their links, one node at a time, while the cluster deploys; a
bad release is undone on the first node and the rollout stops there; a worker of the
previous release is skipped by name, never sent a message it cannot read.

Workers run from the releases layout under the guard (systemd/deploy-agent-guard) as
`bootstrap` installs them, without systemd (the guard restarts the agent itself). The
releases are this checkout's code under other version labels.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from tests.support.contexts import busybox_context
from tests.support.dockerd import Dockerd
from tests.support.leader import LeaderProcess
from tests.support.registry import Registry
from tests.support.releases import Installed, Layout, build_release, install_layout
from tests.support.wheels import Wheelhouse
from tests.support.worker import WorkerProcess

WorkerFactory = Callable[..., WorkerProcess]
TLS = {"plain_http": None}
# the releases' wheels are built once for the module; its tests share one process
pytestmark = pytest.mark.xdist_group("upgrades")
SCRIPT = str(Path(sys.executable).parent / "deploy-agent")
START, TARGET, BROKEN_IMPORT, BROKEN_START = "0.2.1", "0.2.2", "0.2.3", "0.2.4"


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Wheels of this checkout as four releases: two good, one that fails at import and
    one that imports (and says its version) but cannot start."""
    out = tmp_path_factory.mktemp("releases")
    yield {
        START: build_release(out, START),
        TARGET: build_release(out, TARGET),
        BROKEN_IMPORT: build_release(
            out, BROKEN_IMPORT, patch=("agent/wire.py", "PROTOCOL_VERSION = 2", "import nowhere")
        ),
        BROKEN_START: build_release(
            out,
            BROKEN_START,
            patch=(
                "agent/daemon.py",
                "    redactor.add(*config.secrets())\n",
                "    raise SystemExit(1)\n",
            ),
        ),
    }


async def _layouts(root: Path, wheel: Path, wheelhouse: Wheelhouse) -> list[Layout]:
    """Two nodes' releases layouts with `wheel` current, installed side by side."""
    installs = [
        asyncio.to_thread(install_layout, root / name, wheel, wheelhouse.directory)
        for name in ("w1", "w2")
    ]
    return list(await asyncio.gather(*installs))


async def _cluster(
    leader: LeaderProcess,
    registry: Registry,
    engines: list[Dockerd],
    worker_process: WorkerFactory,
    layouts: list[Layout],
) -> list[WorkerProcess]:
    status, _ = await leader.api.put_registry(registry.host, registry.username, registry.password)
    assert status == 200
    token = await leader.api.join_token()
    workers = [
        worker_process(
            f"w{i}", engine, leader.api.base_url, token, command=[str(layout.guard)]
        ).start(env={"DEPLOY_AGENT_RESTART_SECONDS": "1"})
        for i, (engine, layout) in enumerate(zip(engines, layouts, strict=True), start=1)
    ]
    await _versions(leader, {w.name: START for w in workers})
    return workers


async def _versions(leader: LeaderProcess, expected: dict[str, str], timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while True:
            nodes = await leader.api.nodes()
            found = {n: nodes[n]["agent_version"] for n in expected if n in nodes}
            if found == expected and all(nodes[n]["connected"] for n in expected):
                return
            await asyncio.sleep(0.2)


async def _upgrade(
    leader: LeaderProcess, wheel: Path, wheelhouse: Wheelhouse, *flags: str
) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "DEPLOY_AGENT_URL": leader.api.base_url,
        "DEPLOY_AGENT_TOKEN": leader.token,
        "DEPLOY_AGENT_CA": str(Path(leader.raw["state_dir"]) / "tls" / "ca.pem"),
    }
    return await asyncio.create_subprocess_exec(
        *(SCRIPT, "upgrade", "--wheel", str(wheel), "--wheelhouse", str(wheelhouse.directory)),
        *("--json", *flags),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _finished(proc: asyncio.subprocess.Process) -> tuple[int, list[dict[str, Any]], str]:
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    events = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    return proc.returncode, events, err.decode()


@pytest.fixture
async def cluster(
    leader_process: Callable[..., LeaderProcess],
    registry: Registry,
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    wheelhouse: Wheelhouse,
    releases: dict[str, Path],
    tmp_path: Path,
) -> tuple[LeaderProcess, list[Layout], list[WorkerProcess]]:
    """A leader with a registry, and two workers installed in the releases layout at
    0.2.1, each under its guard and with its own engine."""
    leader = leader_process(leader=TLS)
    leader.start()
    layouts = await _layouts(tmp_path, releases[START], wheelhouse)
    workers = await _cluster(leader, registry, worker_engines, worker_process, layouts)
    return leader, layouts, workers


Cluster = tuple[LeaderProcess, list[Layout], list[WorkerProcess]]


def _holds(engine: Dockerd, image: str) -> bool:
    return engine.cli("image", "inspect", image, check=False).returncode == 0


def _node_events(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["node"], e["status"]) for e in events if e["type"] == "node"]


@pytest.mark.timeout(300)
async def test_upgrade_moves_two_workers_one_at_a_time_while_the_cluster_deploys(
    cluster: Cluster,
    worker_engines: list[Dockerd],
    wheelhouse: Wheelhouse,
    releases: dict[str, Path],
    tmp_path: Path,
) -> None:
    """Both workers go from 0.2.1 to 0.2.2, the second only once the first is back with
    it; the leader restarts in the middle and the rollout goes on; a deployment during
    the rollout and one after it succeed on both workers; each node keeps the release it
    left as `previous` and ends its trial."""
    leader, layouts, _ = cluster

    rollout = await _upgrade(leader, releases[TARGET], wheelhouse)
    async with asyncio.timeout(120):  # the first node back with the release
        while (await leader.api.nodes())["w1"]["agent_version"] != TARGET:
            await asyncio.sleep(0.2)
    leader.terminate()
    leader.start()
    await leader.api.drop_connections()
    during = await leader.api.deploy_dir(busybox_context(tmp_path / "during"), "during")
    code, events, err = await _finished(rollout)

    assert code == 0, err[-3000:]
    assert _node_events(events) == [
        ("w1", "upgrading"),
        ("w1", "upgraded"),
        ("w2", "upgrading"),
        ("w2", "upgraded"),
    ]
    assert any(e["type"] == "resumed" for e in events)
    assert [e["state"] for e in events if e["type"] == "state"] == ["running", "succeeded"]
    progress = [e["state"] for e in events if e["type"] == "progress" and e["node"] == "w2"]
    # downloading again when the leader's restart cut its downloads
    assert progress[0] == "downloading" and progress[-2:] == ["installing", "restarting"]
    seconds = [e["seconds"] for e in events if e["type"] == "node" and e["status"] == "upgraded"]
    print(f"rollout: seconds per node {seconds}")
    await _versions(leader, {"w1": TARGET, "w2": TARGET})
    for layout in layouts:
        assert layout.current() == TARGET
        assert os.readlink(layout.releases / "previous") == START
        assert not (layout.releases / "trial").exists()
        assert layout.versions() == {START, TARGET}
    final = await leader.api.wait_final(during["id"], timeout=120)
    assert final["state"] == "succeeded", final
    async with asyncio.timeout(60):  # a node restarting then was pending, and caught up
        while not all(_holds(engine, final["image"]) for engine in worker_engines):
            await asyncio.sleep(0.5)
    after = await leader.api.deploy_dir(busybox_context(tmp_path / "after"), "after")
    final = await leader.api.wait_final(after["id"])
    assert final["state"] == "succeeded", final
    assert {n: r["status"] for n, r in final["nodes"].items()} == {"w1": "present", "w2": "present"}


@pytest.mark.timeout(300)
async def test_a_bad_release_is_undone_on_the_first_node_and_the_rollout_stops(
    cluster: Cluster, wheelhouse: Wheelhouse, releases: dict[str, Path], tmp_path: Path
) -> None:
    """A release that fails at import never becomes current (its install check fails);
    one that imports but cannot start does, and the guard takes the node back to its
    previous release by itself after three starts. Each time the rollout fails naming
    the first node, and the second is never touched."""
    leader, layouts, (w1, _) = cluster

    code, events, _ = await _finished(await _upgrade(leader, releases[BROKEN_IMPORT], wheelhouse))
    assert code == 1
    assert _node_events(events) == [("w1", "upgrading"), ("w1", "failed")]
    failed = next(e for e in events if e["type"] == "node" and e["status"] == "failed")
    assert "the check step failed" in failed["detail"], failed
    assert layouts[0].current() == START and BROKEN_IMPORT not in layouts[0].versions()

    code, events, err = await _finished(await _upgrade(leader, releases[BROKEN_START], wheelhouse))
    found = re.search(r"upgrade (up-[0-9a-f-]+):", err)
    assert found is not None, err
    assert code == 1
    assert _node_events(events) == [("w1", "upgrading"), ("w1", "failed")]
    failed = next(e for e in events if e["type"] == "node" and e["status"] == "failed")
    assert "rolled back by itself" in failed["detail"], failed
    assert f"release {BROKEN_START} did not start" in failed["detail"], failed
    assert layouts[0].current() == START
    assert layouts[1].current() == START and layouts[1].versions() == {START}
    await asyncio.sleep(5)  # an order sent again to the node it was undone on is refused
    downloads = [
        line
        for line in w1.log_text().splitlines()
        if '"upgrade.progress"' in line and '"downloading"' in line and found.group(1) in line
    ]
    assert len(downloads) == 1, downloads
    await _versions(leader, {"w1": START, "w2": START})
    assert "deploy-agent-guard: release 0.2.4" in w1.log_text()

    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "still"), "still")
    assert (await leader.api.wait_final(dep["id"]))["state"] == "succeeded"


async def test_a_previous_release_worker_is_skipped_by_name(
    leader_process: Callable[..., LeaderProcess],
    worker_engines: list[Dockerd],
    worker_process: WorkerFactory,
    previous_release: Installed,
    wheelhouse: Wheelhouse,
    releases: dict[str, Path],
) -> None:
    """A 0.1.0 worker cannot upgrade itself: the rollout names it as needing a manual
    upgrade and moves on; it never gets an order it cannot read (its link stays up)."""
    leader = leader_process(leader=TLS)
    leader.start()
    token = await leader.api.join_token()
    old = worker_process(
        "old", worker_engines[0], leader.api.base_url, token, python=previous_release.python
    ).start()
    await leader.api.wait_nodes(old=True)

    code, events, err = await _finished(await _upgrade(leader, releases[TARGET], wheelhouse))

    assert code == 0, err[-2000:]
    (skipped,) = [e for e in events if e["type"] == "node"]
    assert (skipped["node"], skipped["status"]) == ("old", "skipped")
    assert "needs a manual upgrade" in skipped["detail"]
    assert (await leader.api.nodes())["old"]["connected"] is True
    assert "bad_message" not in old.log_text()


@pytest.mark.parametrize(
    "path",
    [
        "/v1/upgrades/%2E%2E/files/x.whl",
        "/v1/upgrades/..%2F..%2Fstate/files/leader.whl",
        "/v1/upgrades/up-20260101000000-0123abcd/files/deploy_agent-9.0-py3-none-any.whl",
    ],
)
async def test_an_upgrade_file_is_served_only_from_the_running_upgrade(
    leader_factory: Callable[..., Any], path: str
) -> None:
    """The files route takes a node's secret (no secret: 401), and serves nothing but the
    files of the upgrade that runs: an id that climbs out of the upgrades directory, or
    one that is not running, is refused, whatever secret comes with it."""
    leader = await leader_factory(leader=TLS)
    token = await leader.api.join_token()
    status, node = await leader.api.request("POST", "/v1/join", json={"token": token, "name": "n"})
    assert status == 201
    url = URL(leader.api.base_url + path, encoded=True)  # sent as written, dots and all
    async with leader.api.session.get(url, ssl=leader.api.ssl) as response:
        assert response.status == 401
    secret = {"Authorization": f"Node {node['node_id']}:{node['secret']}"}
    async with leader.api.session.get(url, headers=secret, ssl=leader.api.ssl) as response:
        # 404 where the route matched, 401 where the path is no node's (the API token's)
        assert response.status in (401, 404)
        assert "error" in await response.json()
