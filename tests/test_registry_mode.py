"""Registry mode: credentials verified before they are kept, pushes by digest, retries that
ride out an outage, and failures that say what to do."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.leader.state.models import NodeRecord
from tests.support.contexts import busybox_context
from tests.support.dockerd import Dockerd
from tests.support.leader import InProcessLeader
from tests.support.registry import Registry


async def _with_registry(leader: InProcessLeader, registry: Registry) -> None:
    status, doc = await leader.api.put_registry(registry.host, registry.username, registry.password)
    assert status == 200, doc


async def test_registry_deployment_is_pushed_and_the_registry_serves_its_digest(
    leader: InProcessLeader, registry: Registry, tmp_path: Path
) -> None:
    """A registry-mode deployment ends with `repository@digest`, and the registry serves it."""
    await _with_registry(leader, registry)
    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "web")

    final = await leader.api.wait_final(dep["id"])

    assert final["state"] == "succeeded", final
    assert final["mode"] == "registry"
    repository = f"{registry.host}/{registry.username}/web"
    assert final["image"] == f"{repository}@{final['digest']}"
    assert list(final["stages"]) == ["building", "pushing", "distributing"]
    served = registry.manifest_digest(f"{registry.username}/web", dep["id"])
    assert served == final["digest"]


async def test_wrong_credentials_are_refused_with_422_and_the_old_ones_stay(
    leader: InProcessLeader, registry: Registry
) -> None:
    """PUT /v1/registry with a wrong password answers 422 with the registry's reason."""
    await _with_registry(leader, registry)
    _, before = await leader.api.request("GET", "/v1/registry")

    status, doc = await leader.api.put_registry(registry.host, registry.username, "wrong-pass")

    assert status == 422
    assert "401" in doc["error"]["message"]
    _, after = await leader.api.request("GET", "/v1/registry")
    assert after == before
    assert "password" not in after["registry"]


async def test_password_changed_on_the_registry_fails_the_push_at_once(
    leader: InProcessLeader, registry: Registry, tmp_path: Path
) -> None:
    """A 401 on push is push_unauthorized within 5 s of the push starting, with no retry."""
    await _with_registry(leader, registry)
    registry.rotate_password("rotated-elsewhere")
    registry.restart()
    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "auth")

    final = await leader.api.wait_final(dep["id"])

    assert final["state"] == "failed"
    assert final["error"]["code"] == "push_unauthorized"
    assert "write" in final["error"]["hint"]
    assert final["push_retries"] == 0
    push = final["stages"]["pushing"]
    assert push["finished_at"] - push["started_at"] < 5


async def test_registry_outage_during_push_is_retried_until_it_returns(
    leader: InProcessLeader, registry: Registry, tmp_path: Path
) -> None:
    """With the registry down when the push starts and back 6 s later, the deployment succeeds."""
    await _with_registry(leader, registry)
    registry.stop()
    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "outage")
    await leader.api.wait_state(dep["id"], "pushing")
    await asyncio.sleep(6)
    registry.start()

    final = await leader.api.wait_final(dep["id"])

    assert final["state"] == "succeeded", final
    assert final["push_retries"] >= 1
    retries = [e for e in await leader.api.events(dep["id"]) if e["type"] == "push.retry"]
    assert len(retries) == final["push_retries"]
    assert "connection refused" in retries[0]["error"]


async def test_registry_down_past_the_budget_is_registry_unreachable(
    leader_factory: object, registry: Registry, tmp_path: Path
) -> None:
    """With a 4 s budget and the registry gone, the push fails as registry_unreachable in time."""
    leader = await leader_factory(leader={"push_retry_budget": 4})  # type: ignore[operator]
    await _with_registry(leader, registry)
    registry.stop()
    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "gone")
    await leader.api.wait_state(dep["id"], "pushing")
    started = time.monotonic()

    final = await leader.api.wait_final(dep["id"])

    assert time.monotonic() - started < 4 + 10
    assert final["state"] == "failed"
    assert final["error"]["code"] == "registry_unreachable"
    assert final["push_retries"] >= 1


async def test_image_on_another_host_is_refused_with_a_hint(
    leader: InProcessLeader, registry: Registry, tmp_path: Path
) -> None:
    """An image outside the configured registry's host is a 400 naming both hosts."""
    await _with_registry(leader, registry)
    status, doc = await leader.api.request(
        "POST",
        "/v1/deployments",
        json={"app": "x", "git": {"url": "file:///nowhere"}, "image": "ghcr.io/acme/x"},
    )
    assert status == 400
    assert "ghcr.io" in doc["error"]["message"]
    assert registry.host in doc["error"]["message"]
    assert "image not found" in doc["error"]["hint"]


async def test_enrolled_worker_without_registry_is_409_registry_required(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """Once a worker is enrolled, a deployment without credentials is refused with 409."""
    assert leader.leader.ctx is not None
    node = NodeRecord(id="n-1", name="worker-1", enrolled_at=time.time())
    await leader.leader.ctx.store.add_node(node, "not-a-real-secret-hash")

    status, doc = await leader.api.deploy_dir_raw(busybox_context(tmp_path / "c"), "app")

    assert status == 409
    assert doc["error"]["code"] == "registry_required"
    assert "1 worker" in doc["error"]["message"]
    assert "registry" in doc["error"]["hint"]
    _, listing = await leader.api.request("GET", "/v1/deployments")
    assert listing["deployments"] == []
    _, cluster = await leader.api.request("GET", "/v1/cluster")
    assert cluster["mode"] == "registry"


PASSWORD_VAR = "DEPLOY_AGENT_TEST_REGISTRY_PASSWORD"


async def _registry_version(leader: InProcessLeader, above: int, within: float) -> int | None:
    """The credentials version once it passes `above`, or None if it does not in time."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while True:
                _, doc = await leader.api.request("GET", "/v1/registry")
                if doc["registry"] and doc["registry"]["version"] > above:
                    return int(doc["registry"]["version"])
                await asyncio.sleep(0.1)
    return None


async def test_a_password_command_is_rerun_and_each_new_token_verified_and_versioned(
    leader_factory: Callable[..., Any],
    registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """With registry.password_command (here: print an environment variable) the leader
    sets the registry at start, refuses a token the registry refuses (the one in force
    stays), and takes the next good one as a new version, as a short-lived token's
    rotation goes."""
    monkeypatch.setenv(PASSWORD_VAR, registry.password)
    seed = {
        "server": registry.host,
        "username": registry.username,
        "password_command": f'printf "%s\\n" "${PASSWORD_VAR}"',
        "password_refresh_s": 0.5,
    }
    leader = await leader_factory(registry=seed)
    first = await _registry_version(leader, 0, within=10)
    assert first is not None

    monkeypatch.setenv(PASSWORD_VAR, "not-the-password")
    assert await _registry_version(leader, first, within=2.5) is None

    monkeypatch.setenv(PASSWORD_VAR, registry.rotate_password("from-a-command"))
    registry.restart()
    rotated = await _registry_version(leader, first, within=15)
    assert rotated is not None
    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "rotating")
    assert (await leader.api.wait_final(dep["id"]))["state"] == "succeeded"


async def test_a_retry_is_replayed_though_the_request_would_now_be_refused(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """A submission with an Idempotency-Key is accepted in local mode; a worker enrols
    before the client's retry (the answer was lost, say): the identical retry gets the
    deployment it made, not the 409 a new submission gets."""
    assert leader.leader.ctx is not None
    context = busybox_context(tmp_path / "c")
    key = {"Idempotency-Key": "retry-after-enrolment"}
    first_status, first = await leader.api.deploy_dir_raw(context, "app", headers=key)
    node = NodeRecord(id="n-1", name="worker-1", enrolled_at=time.time())
    await leader.leader.ctx.store.add_node(node, "not-a-real-secret-hash")

    retry_status, retry = await leader.api.deploy_dir_raw(context, "app", headers=key)
    replayed = leader.api.last_headers.get("Idempotent-Replayed")
    new_status, new = await leader.api.deploy_dir_raw(context, "app")

    assert (first_status, retry_status, replayed) == (202, 202, "true")
    assert retry["id"] == first["id"]
    assert (new_status, new["error"]["code"]) == (409, "registry_required")
    await leader.api.request("POST", f"/v1/deployments/{first['id']}/cancel")
    await leader.api.wait_final(first["id"])


async def test_the_configs_registry_is_set_once_a_late_engine_answers(
    leader_factory: Callable[..., Any], registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Docker starts after the leader: the config's [registry] cannot be checked at
    start, and is set (version 1) once the engine answers, not left unset until the
    leader restarts."""
    monkeypatch.setenv(PASSWORD_VAR, registry.password)
    seed = {"server": registry.host, "username": registry.username, "password_env": PASSWORD_VAR}
    engine = Dockerd()  # started only once the leader runs
    try:
        leader = await leader_factory(engine={"url": engine.url}, registry=seed)
        _, before = await leader.api.request("GET", "/v1/registry")
        await asyncio.to_thread(engine.start)

        assert before["registry"] is None
        assert await _registry_version(leader, 0, within=30) == 1
    finally:
        await asyncio.to_thread(engine.stop)


async def test_the_configs_registry_is_set_once_a_late_registry_answers(
    leader_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry is not up when the leader starts (the network comes later): the
    config's credentials are tried again, and set once it answers, not taken for
    refused."""
    late = Registry()  # started only once the leader runs
    monkeypatch.setenv(PASSWORD_VAR, late.password)
    seed = {"server": late.host, "username": late.username, "password_env": PASSWORD_VAR}
    try:
        leader = await leader_factory(registry=seed)
        _, before = await leader.api.request("GET", "/v1/registry")
        await asyncio.to_thread(late.start)

        assert before["registry"] is None
        assert await _registry_version(leader, 0, within=30) == 1
    finally:
        late.cleanup()
