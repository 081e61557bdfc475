"""The store's schema across releases: a store the previous release wrote is migrated
forward at start with nothing lost, and a store from a newer release is refused.

The previous release runs for real (its wheel, tests/releases/), on a real engine with a
registry that needs a login, and is killed mid-build, as an upgrade would find it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.leader.state import schema
from agent.leader.state.schema import LATEST, Migration
from agent.leader.state.store import Store
from tests.support.contexts import busybox_context, run_step
from tests.support.dockerd import Dockerd
from tests.support.leader import LeaderProcess, leader_config
from tests.support.procs import free_port
from tests.support.registry import Registry
from tests.support.releases import Installed

TLS = {"plain_http": None}
GIT_SECRET = "glpat-not-a-real-token-4711"


def _store_bytes(state: Path) -> bytes:
    """Every byte of the store's files, the WAL's included."""
    return b"".join(p.read_bytes() for p in state.glob("leader.db*") if p.is_file())


def _store_version(state: Path) -> int:
    with contextlib.closing(sqlite3.connect(state / "leader.db")) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


async def _wait_state(leader: LeaderProcess, dep_id: str, state: str) -> None:
    async with asyncio.timeout(60):
        while (await leader.api.request("GET", f"/v1/deployments/{dep_id}"))[1]["state"] != state:
            await asyncio.sleep(0.1)


async def test_a_store_of_the_previous_release_keeps_everything_and_its_queue_runs(
    dockerd: Dockerd, registry: Registry, previous_release: Installed, tmp_path: Path
) -> None:
    """Deployments succeeded, failed, running (the leader killed mid-build) and queued;
    a node; registry credentials; webhook deliveries: all there after the migration, and
    the running and queued deployments then finish on the new leader."""
    state = tmp_path / "state"
    hook = f"http://127.0.0.1:{free_port()}/hook"  # nobody listens: deliveries stay pending
    raw: dict[str, Any] = leader_config(
        state,
        dockerd.url,
        leader={
            **TLS,
            "max_parallel_builds": 1,
            "webhooks": [{"url": hook, "secret": "s" * 24}],
        },
    )
    (tmp_path / "old").mkdir()
    old = LeaderProcess(raw, tmp_path / "old", python=previous_release.python)
    old.start()
    try:
        status, _ = await old.api.put_registry(registry.host, registry.username, registry.password)
        assert status == 200
        token = await old.api.join_token()
        status, node = await old.api.request(
            "POST", "/v1/join", json={"token": token, "name": "w-old"}
        )
        assert status == 201, node
        done = await old.api.deploy_dir(busybox_context(tmp_path / "done"), "done")
        assert (await old.api.wait_final(done["id"]))["state"] == "succeeded"
        git = {"url": f"https://deploy:{GIT_SECRET}@127.0.0.1:{free_port()}/app.git"}
        status, cloned = await old.api.request(
            "POST", "/v1/deployments", json={"app": "git", "git": git}
        )
        assert status == 202, cloned
        assert (await old.api.wait_final(cloned["id"]))["state"] == "failed"
        failing = busybox_context(tmp_path / "bad", run_step("exit 3"))
        bad = await old.api.deploy_dir(failing, "bad")
        assert (await old.api.wait_final(bad["id"]))["state"] == "failed"
        slow_context = busybox_context(tmp_path / "slow", run_step("sleep 8"))
        slow = await old.api.deploy_dir(slow_context, "slow")
        queued = await old.api.deploy_dir(busybox_context(tmp_path / "queued"), "queued")
        await _wait_state(old, slow["id"], "building")
    finally:
        old.kill()
        await old.api.close()
    assert _store_version(state) == 0  # the previous release kept no version
    assert GIT_SECRET.encode() in _store_bytes(state)  # as that release kept it

    (tmp_path / "new").mkdir()
    new = LeaderProcess(raw, tmp_path / "new")
    new.start()
    try:
        api = new.api
        assert '"event": "store.migrated"' in new.log_text()
        assert _store_version(state) == LATEST
        _, doc = await api.request("GET", f"/v1/deployments/{done['id']}")
        assert (doc["state"], doc["digest"]) == ("succeeded", doc["digest"]) and doc["digest"]
        _, doc = await api.request("GET", f"/v1/deployments/{bad['id']}")
        assert (doc["state"], doc["error"]["code"]) == ("failed", "build_failed")
        for dep in (slow, queued):
            final = await api.wait_final(dep["id"], timeout=120)
            assert final["state"] == "succeeded", final
        nodes = await api.nodes()
        assert nodes["w-old"]["id"] == node["node_id"]
        status, reg = await api.request("GET", "/v1/registry")
        assert status == 200
        assert (reg["registry"]["server"], reg["registry"]["username"]) == (
            registry.host,
            registry.username,
        )
        _, hooks = await api.request("GET", f"/v1/deployments/{done['id']}/webhooks")
        assert {h["event_state"] for h in hooks["webhooks"]} >= {"queued", "succeeded"}
        events = await api.events(done["id"])
        assert [e["state"] for e in events if e["type"] == "state"][-1] == "succeeded"
        _, doc = await api.request("GET", f"/v1/deployments/{cloned['id']}")
        assert doc["source"]["url"].startswith("https://***@127.0.0.1:"), doc["source"]
        assert GIT_SECRET.encode() not in _store_bytes(state)  # gone from every file
    finally:
        new.terminate()
        await new.api.close()

    (tmp_path / "again").mkdir()
    again = LeaderProcess(raw, tmp_path / "again")
    again.start()
    again.terminate()
    assert "store.migrated" not in again.log_text()  # at the newest version: nothing runs


async def test_a_store_of_a_newer_release_is_refused_by_name(
    dockerd: Dockerd, tmp_path: Path
) -> None:
    """A leader that finds a schema newer than it knows exits 2 (not restarted by its
    unit) and says which version it found and what to do; the store is left untouched."""
    state = tmp_path / "state"
    store = Store(state / "leader.db")
    await store.open()
    await store.set_join_token("ab" * 32)
    await store.close()
    db = sqlite3.connect(state / "leader.db", isolation_level=None)
    db.execute(f"PRAGMA user_version = {LATEST + 5}")
    db.close()  # the last connection's close checkpoints: the file holds it all
    before = (state / "leader.db").read_bytes()

    proc = LeaderProcess(leader_config(state, dockerd.url), tmp_path)
    done = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "agent", "run", "-c", str(proc.config_path)),
        env={**os.environ, **proc.secret_env},
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(done.communicate(), 60)
    assert done.returncode == 2, output.decode()[-2000:]
    text = output.decode()
    assert f"schema version {LATEST + 5}" in text
    assert f"versions up to {LATEST}" in text
    assert (state / "leader.db").read_bytes() == before


def test_a_failing_migration_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All pending migrations run in one transaction: one that fails leaves the store at
    its old version with none of the others' changes."""

    def broken(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half_done (x)")
        raise sqlite3.OperationalError("disk I/O error")

    migrations = (*schema.MIGRATIONS, Migration(LATEST + 1, "broken", broken))
    monkeypatch.setattr(schema, "MIGRATIONS", migrations)
    monkeypatch.setattr(schema, "LATEST", LATEST + 1)
    db = sqlite3.connect(tmp_path / "leader.db", isolation_level=None)
    with pytest.raises(sqlite3.OperationalError):
        schema.migrate(db, "leader.db")
    assert schema.version_of(db) == 0
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert tables == set()
    db.close()
