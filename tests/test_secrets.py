"""The run's canary API token and registry password go through a real leader process and
show up nowhere but in the leader's credential store (the run's final scan looks wider)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.support.canary import CANARY
from tests.support.contexts import busybox_context
from tests.support.leader import LeaderProcess
from tests.support.registry import Registry

CANARY_PASSWORD = CANARY.registry_password
CANARY_TOKEN = CANARY.api_token


async def test_canary_secrets_never_leak(
    leader_process: Callable[..., LeaderProcess], tmp_path: Path
) -> None:
    """After success, a rejected PUT and an unauthorized push, 0 hits outside the store."""
    registry = Registry(password=CANARY_PASSWORD)
    registry.start()
    try:
        leader = leader_process()
        assert leader.api.token == CANARY_TOKEN
        leader.start()
        await _exercise(leader, registry, tmp_path)
        argv_run = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
        argv = argv_run.stdout
    finally:
        registry.cleanup()
    leader.terminate()

    places = {"log": leader.log_text(), "argv": argv, "responses": "\n".join(leader.api.responses)}
    state = Path(leader.raw["state_dir"])
    for path in state.rglob("*"):
        if path.is_file() and not path.name.startswith("leader.db"):
            places[str(path)] = path.read_text(errors="replace")
    for secret in (CANARY_PASSWORD, CANARY_TOKEN):
        assert [name for name, text in places.items() if secret in text] == []
    assert "push_unauthorized" in places["responses"]  # the scan saw the failure paths


async def _exercise(leader: LeaderProcess, registry: Registry, tmp_path: Path) -> None:
    api = leader.api
    status, _ = await api.put_registry(registry.host, registry.username, CANARY_PASSWORD + "x")
    assert status == 422
    status, _ = await api.put_registry(registry.host, registry.username, CANARY_PASSWORD)
    assert status == 200
    ok = await api.deploy_dir(busybox_context(tmp_path / "ctx"), "canary")
    assert (await api.wait_final(ok["id"]))["state"] == "succeeded"
    registry.rotate_password("changed-on-the-registry")
    registry.restart()
    bad = await api.deploy_dir(busybox_context(tmp_path / "ctx"), "canary")
    assert (await api.wait_final(bad["id"]))["error"]["code"] == "push_unauthorized"
    for path in ("/v1/registry", "/v1/cluster", "/v1/deployments", f"/v1/deployments/{bad['id']}"):
        status, _ = await api.request("GET", path)
        assert status == 200
    await api.events(ok["id"])
