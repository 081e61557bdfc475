"""The leader's store under faults of SQLite itself."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import msgspec
import pytest

from agent.leader.state.models import Deployment, DeploymentRequest, Mode, State
from agent.leader.state.store import Store


async def test_a_failed_commit_leaves_the_store_usable(tmp_path: Path) -> None:
    """A COMMIT that fails (a full disk or an I/O error would; here a deferred constraint
    does) is rolled back: left open, every later transaction would fail until a restart."""
    store = Store(tmp_path / "leader.db")
    await store.open()
    try:

        def commit_fails() -> None:
            db = store._db
            assert db is not None
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
            db.execute(
                "CREATE TABLE child (parent INTEGER"
                " REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
            )
            with store._tx() as tx:
                tx.execute("INSERT INTO child VALUES (1)")  # no parent 1: COMMIT refuses

        with pytest.raises(sqlite3.IntegrityError):
            await store._call(commit_fails)

        await store.set_join_token("ab" * 32)
        assert await store.join_token_hash() == "ab" * 32
    finally:
        await store.close()


async def test_workers_are_told_to_hold_every_apps_newest_image_however_old(
    tmp_path: Path,
) -> None:
    """The Sync names each app's newest pushed image: an app last deployed before
    thousands of another's deployments is still in it (the list once stopped at the
    newest 5,000 deployments of all apps)."""
    store = Store(tmp_path / "leader.db")
    await store.open()
    try:
        await store.create(_pushed("rare-1", "rare", "1", State.SUCCEEDED), None)
        await store.create(_pushed("rare-2", "rare", "2", State.SUCCEEDED), None)
        await store.create(_pushed("rare-3", "rare", "3", State.FAILED), None)  # not held

        def many_deployments() -> None:
            with store._tx() as db:
                for i in range(5_001):
                    dep = _pushed(f"busy-{i}", "busy", f"{i % 10}", State.SUCCEEDED)
                    db.execute(
                        "INSERT INTO deployments (id, app, state, doc) VALUES (?, ?, ?, ?)",
                        (dep.id, dep.app, dep.state.value, msgspec.json.encode(dep)),
                    )

        await store._call(many_deployments)

        held = sorted(await store.images_to_hold())
    finally:
        await store.close()
    assert held == [
        "registry.test/busy@sha256:" + "0" * 64,  # busy-5000
        "registry.test/rare@sha256:" + "2" * 64,
    ]


def _pushed(dep_id: str, app: str, digit: str, state: State) -> Deployment:
    return Deployment(
        id=dep_id,
        app=app,
        state=state,
        mode=Mode.REGISTRY,
        request=DeploymentRequest(app=app),
        source="upload",
        created_at=0.0,
        updated_at=0.0,
        repository=f"registry.test/{app}",
        tag=dep_id,
        digest="sha256:" + digit * 64,
    )


async def test_what_the_leader_promised_is_committed_durably_and_log_lines_are_not(
    tmp_path: Path,
) -> None:
    """An accepted deployment (answered 202) must survive the host's power loss, not just
    the leader's crash: its COMMIT syncs the WAL. Build log lines and progress, the bulk
    of the writes, keep the cheaper mode."""
    store = Store(tmp_path / "leader.db")
    await store.open()
    statements: list[str] = []

    def trace() -> None:
        assert store._db is not None
        store._db.set_trace_callback(statements.append)

    def synchronous() -> int:
        assert store._db is not None
        return int(store._db.execute("PRAGMA synchronous").fetchone()[0])

    try:
        await store._call(trace)
        dep = _pushed("d-1", "app", "1", State.QUEUED)
        await store.create(dep, None)
        created = list(statements)
        statements.clear()
        await store.append_event(dep.id, {"type": "log", "line": "step 1/2"})
        appended = list(statements)
        mode = await store._call(synchronous)
    finally:
        await store.close()

    order = [created.index(s) for s in ("PRAGMA synchronous=FULL", "BEGIN IMMEDIATE", "COMMIT")]
    assert order == sorted(order)
    assert created[-1] == "PRAGMA synchronous=NORMAL"
    assert "PRAGMA synchronous=FULL" not in appended and "COMMIT" in appended
    assert mode == 1  # NORMAL again


async def test_old_deployments_history_goes_and_their_records_stay(tmp_path: Path) -> None:
    """Past the cutoff a finished deployment's events and settled webhook deliveries
    are deleted, in batches; its record stays. A newer one, and one still running
    however old, keep everything."""
    store = Store(tmp_path / "leader.db", ("https://cp.test/hook",))
    await store.open()
    day = 24 * 3600.0
    old = [_finished_at(f"old-{i}", 100 * day) for i in range(5)]
    recent = _finished_at("recent", 1 * day)
    running = _pushed("running", "app", "1", State.BUILDING)
    try:
        for dep in (*old, recent, running):
            await store.create(dep, None)  # its "queued" event and webhook delivery
            for line in range(3):
                await store.append_event(dep.id, {"type": "log", "line": f"step {line}"})
        await store.webhook_result(1, state="delivered", next_at=0.0, status=204, error=None)

        pruned = await store.prune_history(time.time() - 90 * day, scan=2)

        assert pruned == (5, 5 * 4)
        for dep in old:
            assert await store.events_after(dep.id, 0) == []
            assert await store.get(dep.id) is not None
        assert len(await store.events_after(recent.id, 0)) == 4
        assert len(await store.events_after(running.id, 0)) == 4
        assert await store.webhooks_of("old-0") == []  # delivered: gone
        assert len(await store.webhooks_of("old-1")) == 1  # still to send: kept
        assert await store.prune_history(time.time() - 90 * day) == (0, 0)
    finally:
        await store.close()


def _finished_at(dep_id: str, ago: float) -> Deployment:
    dep = _pushed(dep_id, "app", "1", State.SUCCEEDED)
    dep.finished_at = time.time() - ago
    return dep
