"""The leader's store under faults of SQLite itself."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.leader.store import Store


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
