"""The store's schema, versioned: each migration takes it one version forward.

A store records its version in SQLite's `user_version` (a store of the first release,
0.1.0, has none: 0). At start every migration past it runs, in order, in ONE transaction:
the store is at the newest version with everything moved, or untouched. A store newer
than this release knows is refused: it would be read wrong, and there is no way back
down (no silent downgrade).

A migration is a function of the connection, inside that transaction: statements one
at a time (`executescript` would commit), never a query that depends on the clock.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from agent.errors import ConfigError
from agent.leader.state.scrub import scrub_git_userinfo
from agent.logs import get_logger

log = get_logger(__name__)

# The tables of release 0.1.0, which created them with IF NOT EXISTS at every start and
# kept no version: this first migration is a no-op on such a store, and makes a new one.
_RELEASE_0_1_0 = (
    """CREATE TABLE IF NOT EXISTS deployments (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        app TEXT NOT NULL,
        state TEXT NOT NULL,
        doc BLOB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS deployments_app ON deployments (app, seq)",
    "CREATE INDEX IF NOT EXISTS deployments_state ON deployments (state, seq)",
    """CREATE TABLE IF NOT EXISTS events (
        deployment_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        doc BLOB NOT NULL,
        PRIMARY KEY (deployment_id, seq)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS idempotency (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        deployment_id TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created_at)",
    """CREATE TABLE IF NOT EXISTS registry_credentials (
        version INTEGER PRIMARY KEY AUTOINCREMENT,
        server TEXT,
        username TEXT,
        password TEXT,
        namespace TEXT,
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS nodes (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        enrolled_at REAL NOT NULL,
        revoked_at REAL,
        info BLOB NOT NULL DEFAULT '{}'
    )""",
    """CREATE TABLE IF NOT EXISTS webhooks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        deployment_id TEXT NOT NULL,
        url TEXT NOT NULL,
        body BLOB NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        last_status INTEGER,
        last_error TEXT,
        delivered_at REAL
    )""",
    "CREATE INDEX IF NOT EXISTS webhooks_pending ON webhooks (state, url, id)",
    "CREATE INDEX IF NOT EXISTS webhooks_deployment ON webhooks (deployment_id, id)",
    """CREATE TABLE IF NOT EXISTS join_token (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        secret_hash TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
)


def _statements(*sql: str) -> Callable[[sqlite3.Connection], None]:
    def run(db: sqlite3.Connection) -> None:
        for statement in sql:
            db.execute(statement)

    return run


def _scrub_git_credentials(db: sqlite3.Connection) -> None:
    """Release 0.1.0 kept a git source's user and password in the stored request's URL,
    for good: they go (a deployment still waiting for its clone then fails, asking to be
    submitted again). secure_delete zeroes the old pages; the WAL is emptied after."""
    rows = db.execute(
        "SELECT id, doc FROM deployments WHERE json_extract(doc, '$.request.git.url') LIKE '%@%'"
    ).fetchall()
    for dep_id, doc in rows:
        scrubbed = scrub_git_userinfo(json.loads(doc))
        db.execute(
            "UPDATE deployments SET doc = ? WHERE id = ?",
            (json.dumps(scrubbed, separators=(",", ":")).encode(), dep_id),
        )
    log.info("store.git_credentials_scrubbed", deployments=len(rows))


@dataclass(frozen=True, slots=True)
class Migration:
    version: int  # the schema's version once it has run
    what: str
    run: Callable[[sqlite3.Connection], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "the tables of release 0.1.0", _statements(*_RELEASE_0_1_0)),
    Migration(
        2,
        "agent upgrades: rollouts and their events",
        _statements(
            """CREATE TABLE upgrades (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                id TEXT NOT NULL UNIQUE,
                state TEXT NOT NULL,
                doc BLOB NOT NULL
            )""",
            "CREATE INDEX upgrades_state ON upgrades (state, seq)",
        ),
    ),
    Migration(3, "git sources' credentials out of the stored requests", _scrub_git_credentials),
)
LATEST = MIGRATIONS[-1].version


class SchemaTooNew(ConfigError):
    """The store was written by a newer release than this one."""


def version_of(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, path: str) -> list[int]:
    """Bring the store at `path` to LATEST in one transaction; the versions applied."""
    found = version_of(db)
    if found > LATEST:
        raise SchemaTooNew(
            f"state_dir: {path} has schema version {found}, and this release of "
            f"deploy-agent knows versions up to {LATEST}: a newer release wrote it. Run "
            "that release (there is no downgrade), or restore the state directory from a "
            "backup made before the upgrade"
        )
    pending = [m for m in MIGRATIONS if m.version > found]
    if not pending:
        return []
    db.execute("BEGIN IMMEDIATE")
    try:
        for migration in pending:
            migration.run(db)
            log.info("store.migrated", to=migration.version, what=migration.what)
        db.execute(f"PRAGMA user_version = {LATEST}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    # What a migration replaced (a secret, say) may still be in the WAL's older pages.
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return [m.version for m in pending]
