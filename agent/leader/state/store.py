"""The leader's durable state: SQLite in WAL mode, owned by one thread.

Every call runs on the store's single worker thread, off the event loop. The files are
readable by the agent's user only; this is the one place registry passwords are kept.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from agent.credentials import RegistryCredentials
from agent.leader.state.models import CatchUp, Deployment, NodeInfo, NodeRecord, State
from agent.leader.state.rollouts import Rollout
from agent.leader.state.schema import migrate
from agent.logs import get_logger

T = TypeVar("T")
PAGE_CACHE_KIB = 256
IDEMPOTENCY_TTL_S = 24 * 3600.0  # a retried submission arrives well within a day
log = get_logger(__name__)
_FINAL = tuple(s.value for s in State if s.final)
_encoder = msgspec.json.Encoder()
_decode_deployment = msgspec.json.Decoder(Deployment).decode
_decode_info = msgspec.json.Decoder(NodeInfo).decode
_decode_rollout = msgspec.json.Decoder(Rollout).decode


class Store:
    """Async facade over one SQLite connection that lives on one thread."""

    def __init__(self, path: Path, webhook_urls: tuple[str, ...] = ()) -> None:
        self.path = path
        self._webhook_urls = webhook_urls
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="store")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._call(self._open)

    async def close(self) -> None:
        if self._db is not None:
            await self._call(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        old_umask = os.umask(0o077)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            # SQLite's page cache, 2 MiB by default, sits on the heap for good once filled;
            # the leader's reads are point lookups and short scans the OS page cache serves.
            db.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")
            db.execute("PRAGMA secure_delete=ON")
            try:
                migrate(db, str(self.path))
            except BaseException:
                db.close()  # refused (a newer schema) or failed: nothing was changed
                raise
        finally:
            os.umask(old_umask)
        for suffix in ("", "-wal", "-shm"):
            file = Path(f"{self.path}{suffix}")
            if file.exists():
                file.chmod(0o600)
        self._db = db

    @contextmanager
    def _tx(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction. `durable`: its COMMIT returns once the WAL is on disk.

        The store runs with synchronous=NORMAL: a commit survives the leader's crash but
        may be lost with the host's power (a checkpoint syncs it later). That suits the
        stream of log lines and progress; what the leader has promised someone (a
        deployment answered 202, a state change, credentials, a node's enrolment or
        revocation) is written durable, at the cost of an fsync.
        """
        db = self._db
        assert db is not None, "store is not open"
        if durable:
            db.execute("PRAGMA synchronous=FULL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")  # may fail too (disk full, I/O): then it rolls back
            except BaseException:
                if db.in_transaction:  # left open, every later BEGIN would fail
                    db.execute("ROLLBACK")
                raise
        finally:
            if durable and not db.in_transaction:  # a failed ROLLBACK leaves one open
                db.execute("PRAGMA synchronous=NORMAL")

    # deployments

    async def create(
        self, dep: Deployment, idempotency: tuple[str, str] | None
    ) -> tuple[Deployment, bool]:
        """Insert `dep`, or return the deployment an earlier request with the key made."""
        return await self._call(self._create, dep, idempotency)

    def _create(
        self, dep: Deployment, idempotency: tuple[str, str] | None
    ) -> tuple[Deployment, bool]:
        with self._tx(durable=True) as db:
            if idempotency is not None:
                earlier = self._replayed(db, idempotency)
                if earlier is not None:
                    return earlier, False
                db.execute(
                    "INSERT INTO idempotency VALUES (?, ?, ?, ?)",
                    (idempotency[0], idempotency[1], dep.id, time.time()),
                )
            db.execute(
                "INSERT INTO deployments (id, app, state, doc) VALUES (?, ?, ?, ?)",
                (dep.id, dep.app, dep.state.value, _encoder.encode(dep)),
            )
            self._insert_event(db, dep, {"type": "state", "state": dep.state.value})
        return dep, True

    async def replayed(self, key: str, fingerprint: str) -> Deployment | None:
        """The deployment an earlier request with `key` made, if the key is still held;
        IdempotencyConflict if that request had another fingerprint."""
        return await self._call(self._replayed_tx, (key, fingerprint))

    def _replayed_tx(self, idempotency: tuple[str, str]) -> Deployment | None:
        with self._tx() as db:
            return self._replayed(db, idempotency)

    @staticmethod
    def _replayed(db: sqlite3.Connection, idempotency: tuple[str, str]) -> Deployment | None:
        key, fingerprint = idempotency
        db.execute(
            "DELETE FROM idempotency WHERE created_at < ?", (time.time() - IDEMPOTENCY_TTL_S,)
        )
        row = db.execute(
            "SELECT d.doc, i.fingerprint FROM idempotency i "
            "JOIN deployments d ON d.id = i.deployment_id WHERE i.key = ?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        if row[1] != fingerprint:
            raise IdempotencyConflict(key)
        return _decode_deployment(row[0])

    async def save(self, dep: Deployment, event: dict[str, Any] | None = None) -> int | None:
        """Write `dep`, and with it `event` in the same transaction; return the event's seq."""
        return await self._call(self._save, dep, event)

    def _save(self, dep: Deployment, event: dict[str, Any] | None) -> int | None:
        with self._tx(durable=True) as db:
            db.execute(
                "UPDATE deployments SET state = ?, doc = ? WHERE id = ?",
                (dep.state.value, _encoder.encode(dep), dep.id),
            )
            return None if event is None else self._insert_event(db, dep, event)

    async def get(self, dep_id: str) -> Deployment | None:
        return await self._call(self._get, dep_id)

    def _get(self, dep_id: str) -> Deployment | None:
        assert self._db is not None
        row = self._db.execute("SELECT doc FROM deployments WHERE id = ?", (dep_id,)).fetchone()
        return None if row is None else _decode_deployment(row[0])

    async def list_deployments(
        self, app: str | None, state: str | None, limit: int
    ) -> list[Deployment]:
        return await self._call(self._list_deployments, app, state, limit)

    def _list_deployments(self, app: str | None, state: str | None, limit: int) -> list[Deployment]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT doc FROM deployments WHERE (?1 IS NULL OR app = ?1) "
            "AND (?2 IS NULL OR state = ?2) ORDER BY seq DESC LIMIT ?3",
            (app, state, limit),
        ).fetchall()
        return [_decode_deployment(r[0]) for r in rows]

    async def unfinished(self) -> list[Deployment]:
        """Every deployment not yet final, in submission order."""
        return await self._call(self._unfinished)

    def _unfinished(self) -> list[Deployment]:
        assert self._db is not None
        marks = ",".join("?" * len(_FINAL))
        rows = self._db.execute(
            f"SELECT doc FROM deployments WHERE state NOT IN ({marks}) ORDER BY seq",  # noqa: S608
            _FINAL,
        ).fetchall()
        return [_decode_deployment(r[0]) for r in rows]

    # releases: an app's succeeded deployments, newest first

    async def releases(self, app: str, limit: int) -> list[Deployment]:
        """The app's newest `limit` releases, newest (the current one) first."""
        return await self._call(self._releases, app, limit)

    def _releases(self, app: str, limit: int) -> list[Deployment]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT doc FROM deployments WHERE app = ? AND state = 'succeeded'"
            " ORDER BY seq DESC LIMIT ?",
            (app, limit),
        ).fetchall()
        return [_decode_deployment(r[0]) for r in rows]

    async def release_images(self, app: str, count: int) -> list[str]:
        """The images of the app's newest releases, newest first: `count` distinct ones at
        most (a rollback's image is an earlier release's, counted once)."""
        return await self._call(self._release_images, app, count)

    def _release_images(self, app: str, count: int) -> list[str]:
        assert self._db is not None
        cursor = self._db.execute(
            "SELECT doc FROM deployments WHERE app = ? AND state = 'succeeded' ORDER BY seq DESC",
            (app,),
        )
        images: list[str] = []
        for (doc,) in cursor:
            image = _decode_deployment(doc).image_ref
            if image not in images:
                images.append(image)
            if len(images) >= count:
                break
        cursor.close()
        return images

    async def apps(self) -> list[AppSummary]:
        """Every app that has a deployment: its newest deployment and its current release."""
        return await self._call(self._apps)

    def _apps(self) -> list[AppSummary]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT apps.app,"
            " (SELECT doc FROM deployments d WHERE d.app = apps.app ORDER BY d.seq DESC LIMIT 1),"
            " (SELECT doc FROM deployments d WHERE d.app = apps.app AND d.state = 'succeeded'"
            " ORDER BY d.seq DESC LIMIT 1)"
            " FROM (SELECT DISTINCT app FROM deployments) apps ORDER BY apps.app"
        ).fetchall()
        return [
            AppSummary(
                app=app,
                latest=_decode_deployment(latest),
                current=None if current is None else _decode_deployment(current),
            )
            for app, latest, current in rows
        ]

    # events

    async def append_event(self, dep_id: str, event: dict[str, Any]) -> int:
        return await self._call(self._append_event, dep_id, event)

    def _append_event(self, dep_id: str, event: dict[str, Any]) -> int:
        with self._tx() as db:
            return _insert_event_row(db, dep_id, event)

    def _insert_event(self, db: sqlite3.Connection, dep: Deployment, event: dict[str, Any]) -> int:
        """The event, and for a state change a webhook delivery per URL, in one transaction.
        A state change says the deployment's kind (and which release a rollback redeploys)."""
        if event.get("type") == "state":
            event = {**event, "kind": dep.kind}
            if dep.rollback_of is not None:
                event["rollback_of"] = dep.rollback_of
        seq = _insert_event_row(db, dep.id, event)
        if event.get("type") == "state":
            body = _encoder.encode(dep.webhook_payload(seq, event))
            for url in self._webhook_urls:
                db.execute(
                    "INSERT INTO webhooks (deployment_id, url, body, next_at) VALUES (?, ?, ?, ?)",
                    (dep.id, url, body, time.time()),
                )
        return seq

    # webhook deliveries

    async def due_webhooks(self, now: float) -> list[WebhookRow]:
        """The oldest undelivered webhook of each URL, if its next attempt is due."""
        return await self._call(self._due_webhooks, now)

    def _due_webhooks(self, now: float) -> list[WebhookRow]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT id, deployment_id, url, body, attempts, next_at FROM webhooks "
            "WHERE id IN (SELECT MIN(id) FROM webhooks WHERE state = 'pending' GROUP BY url)"
        ).fetchall()
        return [WebhookRow(*row) for row in rows if row[5] <= now]

    async def abandon_webhooks(self, keep_urls: list[str], error: str) -> int:
        """Mark pending deliveries to any URL outside `keep_urls` failed; return how many."""
        return await self._call(self._abandon_webhooks, keep_urls, error)

    def _abandon_webhooks(self, keep_urls: list[str], error: str) -> int:
        with self._tx() as db:
            done = db.execute(
                "UPDATE webhooks SET state = 'failed', last_error = ? WHERE state = 'pending'"
                " AND url NOT IN (SELECT value FROM json_each(?))",
                (error, _encoder.encode(keep_urls)),
            )
            return done.rowcount

    async def webhook_result(
        self, row_id: int, *, state: str, next_at: float, status: int | None, error: str | None
    ) -> None:
        await self._call(self._webhook_result, row_id, state, next_at, status, error)

    def _webhook_result(
        self, row_id: int, state: str, next_at: float, status: int | None, error: str | None
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE webhooks SET state = ?, attempts = attempts + 1, next_at = ?, "
                "last_status = ?, last_error = ?, "
                "delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE NULL END WHERE id = ?",
                (state, next_at, status, error, state, time.time(), row_id),
            )

    async def webhooks_of(self, dep_id: str) -> list[dict[str, Any]]:
        return await self._call(self._webhooks_of, dep_id)

    def _webhooks_of(self, dep_id: str) -> list[dict[str, Any]]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT id, url, json_extract(body, '$.state'), state, attempts, last_status, "
            "last_error, delivered_at FROM webhooks WHERE deployment_id = ? ORDER BY id",
            (dep_id,),
        ).fetchall()
        keys = (
            "delivery",
            "url",
            "event_state",
            "state",
            "attempts",
            "last_status",
            "last_error",
            "delivered_at",
        )
        return [dict(zip(keys, row, strict=True)) for row in rows]

    async def events_after(self, dep_id: str, after: int, limit: int = 500) -> list[bytes]:
        return await self._call(self._events_after, dep_id, after, limit)

    def _events_after(self, dep_id: str, after: int, limit: int) -> list[bytes]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT doc FROM events WHERE deployment_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (dep_id, after, limit),
        ).fetchall()
        return [bytes(r[0]) for r in rows]

    async def prune_history(self, before: float, scan: int = 2000) -> tuple[int, int]:
        """Delete the events, and the settled webhook deliveries, of deployments that
        finished before `before` (the records themselves stay); return (deployments,
        events) pruned. The deployments are read `scan` at a time, in their order, and
        each such slice is pruned in a transaction of its own, so other work goes on
        between them and no scan holds the write lock."""
        cursor, deployments, events = 0, 0, 0
        while True:
            ids, cursor = await self._call(self._finished_before, before, cursor, scan)
            if cursor == 0:
                return deployments, events
            if ids:
                had, removed = await self._call(self._delete_history, ids)
                deployments, events = deployments + had, events + removed

    def _finished_before(self, before: float, after_seq: int, scan: int) -> tuple[list[str], int]:
        """The finished-before-`before` deployments among the `scan` after `after_seq`,
        and where the slice ended (0: there were none)."""
        assert self._db is not None
        rows = self._db.execute(
            "SELECT seq, id, state, json_extract(doc, '$.finished_at') FROM deployments"
            " WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, scan),
        ).fetchall()
        if not rows:
            return [], 0
        old = [r[1] for r in rows if r[2] in _FINAL and r[3] is not None and r[3] < before]
        return old, int(rows[-1][0])

    def _delete_history(self, ids: list[str]) -> tuple[int, int]:
        """Prune these deployments; return how many had events, and how many events."""
        chosen = _encoder.encode(ids)
        with self._tx() as db:
            (had,) = db.execute(
                "SELECT COUNT(DISTINCT deployment_id) FROM events"
                " WHERE deployment_id IN (SELECT value FROM json_each(?))",
                (chosen,),
            ).fetchone()
            removed = db.execute(
                "DELETE FROM events WHERE deployment_id IN (SELECT value FROM json_each(?))",
                (chosen,),
            ).rowcount
            db.execute(
                "DELETE FROM webhooks WHERE deployment_id IN (SELECT value FROM json_each(?))"
                " AND state IN ('delivered', 'failed')",
                (chosen,),
            )
        return int(had), int(removed)

    # registry credentials

    async def credentials(self) -> RegistryCredentials | None:
        return await self._call(self._credentials)

    def _credentials(self) -> RegistryCredentials | None:
        assert self._db is not None
        row = self._db.execute(
            "SELECT version, server, username, password, namespace FROM registry_credentials "
            "ORDER BY version DESC LIMIT 1"
        ).fetchone()
        if row is None or row[1] is None:
            return None
        return RegistryCredentials(
            server=row[1], username=row[2], password=row[3], namespace=row[4], version=row[0]
        )

    async def credentials_version(self) -> int:
        """The newest version, also when it removed the credentials (0: never set)."""
        return await self._call(self._credentials_version)

    def _credentials_version(self) -> int:
        assert self._db is not None
        row = self._db.execute("SELECT COALESCE(MAX(version), 0) FROM registry_credentials")
        return int(row.fetchone()[0])

    async def put_credentials(self, creds: RegistryCredentials | None) -> int:
        """Store a new version (None removes them); older passwords are erased."""
        return await self._call(self._put_credentials, creds)

    def _put_credentials(self, creds: RegistryCredentials | None) -> int:
        values = (
            (creds.server, creds.username, creds.password, creds.namespace)
            if creds
            else (None, None, None, None)
        )
        with self._tx(durable=True) as db:
            db.execute("UPDATE registry_credentials SET password = NULL")
            cursor = db.execute(
                "INSERT INTO registry_credentials "
                "(server, username, password, namespace, created_at) VALUES (?, ?, ?, ?, ?)",
                (*values, time.time()),
            )
            version = int(cursor.lastrowid or 0)
        self._erase_superseded()
        return version

    def _erase_superseded(self) -> None:
        """Rid the files of what the last write superseded. secure_delete zeroes the old
        password's bytes in the page that held it, but the WAL still holds earlier images
        of that page until a checkpoint copies the newest into the database: TRUNCATE
        does that and empties the WAL. Only this connection uses the store, so nothing
        holds the WAL back; should something, the next rotation or stop erases it."""
        assert self._db is not None
        busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            log.warning("store.checkpoint_busy", reason="superseded secrets stay in the WAL")

    # nodes

    async def enrolled_count(self) -> int:
        return await self._call(self._enrolled_count)

    def _enrolled_count(self) -> int:
        assert self._db is not None
        row = self._db.execute("SELECT COUNT(*) FROM nodes WHERE revoked_at IS NULL").fetchone()
        return int(row[0])

    async def add_node(self, node: NodeRecord, secret_hash: str) -> NodeRecord:
        """Enrol `node`, or return the live node of that name if it holds the same secret
        (its enrolment is being retried); raise NameTaken for any other holder."""
        return await self._call(self._add_node, node, secret_hash)

    def _add_node(self, node: NodeRecord, secret_hash: str) -> NodeRecord:
        with self._tx(durable=True) as db:
            taken = db.execute(
                "SELECT id, name, enrolled_at, revoked_at, info, secret_hash FROM nodes "
                "WHERE name = ? AND revoked_at IS NULL",
                (node.name,),
            ).fetchone()
            if taken and hmac.compare_digest(taken[5], secret_hash):
                return _node(taken)
            if taken:
                raise NameTaken(node.name)
            db.execute(
                "INSERT INTO nodes (id, name, secret_hash, enrolled_at, info) "
                "VALUES (?, ?, ?, ?, ?)",
                (node.id, node.name, secret_hash, node.enrolled_at, _encoder.encode(node.info)),
            )
        return node

    async def node_auth(self, node_id: str) -> tuple[NodeRecord, str] | None:
        """The node and its secret's hash, or None if no such node was ever enrolled."""
        return await self._call(self._node_auth, node_id)

    def _node_auth(self, node_id: str) -> tuple[NodeRecord, str] | None:
        assert self._db is not None
        row = self._db.execute(
            "SELECT id, name, enrolled_at, revoked_at, info, secret_hash FROM nodes WHERE id = ?",
            (node_id,),
        ).fetchone()
        return None if row is None else (_node(row), row[5])

    async def nodes(self, *, include_revoked: bool = False) -> list[NodeRecord]:
        return await self._call(self._nodes, include_revoked)

    def _nodes(self, include_revoked: bool) -> list[NodeRecord]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT id, name, enrolled_at, revoked_at, info FROM nodes "
            "WHERE ?1 OR revoked_at IS NULL ORDER BY enrolled_at",
            (include_revoked,),
        ).fetchall()
        return [
            NodeRecord(
                id=r[0],
                name=r[1],
                enrolled_at=r[2],
                revoked_at=r[3],
                info=_decode_info(r[4]),
            )
            for r in rows
        ]

    async def save_node_infos(self, infos: dict[str, NodeInfo]) -> None:
        """Write many nodes' info in one transaction (encoded here, on the caller's thread)."""
        rows = [(_encoder.encode(info), node_id) for node_id, info in infos.items()]
        await self._call(self._save_node_infos, rows)

    def _save_node_infos(self, rows: list[tuple[bytes, str]]) -> None:
        with self._tx() as db:
            db.executemany("UPDATE nodes SET info = ? WHERE id = ?", rows)

    async def record_catch_ups(self, pulls: list[CatchUp]) -> int:
        """Mark nodes present in the finished deployments that left them pending, now that
        they pulled the deployment's image from a Sync; return how many were updated."""
        return await self._call(self._record_catch_ups, pulls) if pulls else 0

    def _record_catch_ups(self, pulls: list[CatchUp]) -> int:
        images = _encoder.encode(sorted({pull.image for pull in pulls}))
        updated = 0
        with self._tx() as db:
            rows = db.execute(
                "SELECT doc FROM deployments WHERE state IN ('succeeded', 'failed', 'cancelled')"
                " AND json_extract(doc, '$.repository') || '@' || json_extract(doc, '$.digest')"
                " IN (SELECT value FROM json_each(?))",
                (images,),
            ).fetchall()
            for (stored,) in rows:
                dep = _decode_deployment(stored)
                applied = [pull.apply(dep) for pull in pulls]  # every one, no short cut
                if any(applied):
                    doc = _encoder.encode(dep)
                    db.execute("UPDATE deployments SET doc = ? WHERE id = ?", (doc, dep.id))
                    updated += 1
        return updated

    async def revoke_node(self, node_id: str) -> str | None:
        """Revoke an enrolled node; return its name, or None if no such node is enrolled."""
        return await self._call(self._revoke_node, node_id)

    def _revoke_node(self, node_id: str) -> str | None:
        with self._tx(durable=True) as db:
            row = db.execute(
                "SELECT name FROM nodes WHERE id = ? AND revoked_at IS NULL", (node_id,)
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE nodes SET revoked_at = ? WHERE id = ?", (time.time(), node_id))
            return str(row[0])

    async def set_join_token(self, secret_hash: str) -> None:
        await self._call(self._set_join_token, secret_hash)

    def _set_join_token(self, secret_hash: str) -> None:
        with self._tx(durable=True) as db:
            db.execute(
                "INSERT OR REPLACE INTO join_token VALUES (1, ?, ?)", (secret_hash, time.time())
            )

    async def join_token_hash(self) -> str | None:
        return await self._call(self._join_token_hash)

    def _join_token_hash(self) -> str | None:
        assert self._db is not None
        row = self._db.execute("SELECT secret_hash FROM join_token WHERE id = 1").fetchone()
        return None if row is None else str(row[0])

    async def images_to_hold(self) -> list[str]:
        """The newest pushed image of each app: what every worker should hold."""
        return await self._call(self._images_to_hold)

    def _images_to_hold(self) -> list[str]:
        """Each app's newest deployment with a pushed image, walking the (app, seq) index
        back from each app's newest row: one or a few rows read per app, however long
        the history (it runs on every link's connect)."""
        assert self._db is not None
        rows = self._db.execute(
            "SELECT (SELECT json_extract(d.doc, '$.repository') || '@' ||"
            " json_extract(d.doc, '$.digest') FROM deployments d"
            " WHERE d.app = apps.app AND d.state IN ('distributing', 'releasing', 'succeeded')"
            " AND json_extract(d.doc, '$.digest') IS NOT NULL"
            " AND json_extract(d.doc, '$.repository') IS NOT NULL ORDER BY d.seq DESC LIMIT 1)"
            " FROM (SELECT DISTINCT app FROM deployments) apps"
        ).fetchall()
        return [image for (image,) in rows if image is not None]

    # agent rollouts: their records, and their events in the events table by their id

    async def save_rollout(self, rollout: Rollout, event: dict[str, Any] | None = None) -> None:
        """Insert or update `rollout`, with `event` in the same transaction."""
        await self._call(self._save_rollout, rollout, event)

    def _save_rollout(self, rollout: Rollout, event: dict[str, Any] | None) -> None:
        with self._tx(durable=True) as db:
            db.execute(
                "INSERT INTO upgrades (id, state, doc) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET state = excluded.state, doc = excluded.doc",
                (rollout.id, rollout.state.value, _encoder.encode(rollout)),
            )
            if event is not None:
                _insert_event_row(db, rollout.id, event)

    async def rollout(self, rollout_id: str) -> Rollout | None:
        return await self._call(self._rollout, rollout_id)

    def _rollout(self, rollout_id: str) -> Rollout | None:
        assert self._db is not None
        row = self._db.execute("SELECT doc FROM upgrades WHERE id = ?", (rollout_id,)).fetchone()
        return None if row is None else _decode_rollout(row[0])

    async def rollouts(self, *, running: bool = False, limit: int = 20) -> list[Rollout]:
        """The newest rollouts first; with `running`, only those not finished."""
        return await self._call(self._rollouts, running, limit)

    def _rollouts(self, running: bool, limit: int) -> list[Rollout]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT doc FROM upgrades WHERE NOT ?1 OR state = 'running' ORDER BY seq DESC LIMIT ?2",
            (running, limit),
        ).fetchall()
        return [_decode_rollout(r[0]) for r in rows]


def _insert_event_row(db: sqlite3.Connection, dep_id: str, event: dict[str, Any]) -> int:
    row = db.execute(
        "SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE deployment_id = ?", (dep_id,)
    ).fetchone()
    seq = int(row[0])
    doc = {"seq": seq, "at": round(time.time(), 3), **event}
    db.execute("INSERT INTO events VALUES (?, ?, ?)", (dep_id, seq, _encoder.encode(doc)))
    return seq


@dataclass(frozen=True, slots=True)
class AppSummary:
    app: str
    latest: Deployment  # its newest deployment, whatever its state
    current: Deployment | None  # its newest release


@dataclass(frozen=True, slots=True)
class WebhookRow:
    id: int
    deployment_id: str
    url: str
    body: bytes
    attempts: int
    next_at: float


def _node(row: tuple[Any, ...]) -> NodeRecord:
    return NodeRecord(
        id=row[0], name=row[1], enrolled_at=row[2], revoked_at=row[3], info=_decode_info(row[4])
    )


class NameTaken(Exception):
    """An active node already has this name."""


class IdempotencyConflict(Exception):
    """An Idempotency-Key was reused for a different request."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key
