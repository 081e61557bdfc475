"""Webhooks to the control plane: each state change, POSTed and signed, until delivered.

Deliveries are rows in the store, written with the state change itself, so they survive
a restart. One URL's deliveries go out in order; a failing receiver is retried with
backoff and never holds up another URL.

Signature: `X-Deploy-Agent-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`
with the timestamp (Unix seconds) in `X-Deploy-Agent-Timestamp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random
import sqlite3
import time

import aiohttp

from agent.config import WebhookConfig
from agent.leader.state.store import Store, WebhookRow
from agent.logs import get_logger
from agent.urls import redact_url

log = get_logger(__name__)
TIMEOUT = aiohttp.ClientTimeout(total=10, connect=5)
MAX_ATTEMPTS = 30
MAX_DELAY = 300.0
IDLE_POLL = 1.0


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def retry_delay(attempts: int) -> float:
    """After `attempts` failures: 2, 4, 8 … seconds, capped at 5 minutes, with jitter."""
    ceiling = min(MAX_DELAY, 2.0**attempts)
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 (jitter, not crypto)


NOT_CONFIGURED = "not sent: the URL is no longer in the leader's webhooks"


class WebhookSender:
    def __init__(self, store: Store, hooks: tuple[WebhookConfig, ...]) -> None:
        self._store = store
        self._secrets = {hook.url: hook.secret for hook in hooks}
        self._wake = asyncio.Event()
        # A URL whose last result could not be saved waits here, not on its row: without
        # this, the row still due would be sent again at every poll.
        self._not_before: dict[str, float] = {}

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Send what is due, one delivery in flight per URL, each URL at its own pace: a
        slow receiver holds up its own deliveries only."""
        sending: dict[str, asyncio.Task[None]] = {}
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            try:
                while True:
                    self._wake.clear()
                    for row in await self._due():
                        if row.url not in sending:
                            sending[row.url] = self._start(session, row, sending)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(IDLE_POLL):
                            await self._wake.wait()
            finally:
                for task in sending.values():
                    task.cancel()
                await asyncio.gather(*sending.values(), return_exceptions=True)

    async def _due(self) -> list[WebhookRow]:
        now = time.time()
        try:
            rows = await self._store.due_webhooks(now)
        except sqlite3.Error as exc:  # the next poll asks again
            log.error("webhook.poll_failed", error=repr(exc))
            return []
        return [row for row in rows if self._not_before.get(row.url, 0.0) <= now]

    def _start(
        self,
        session: aiohttp.ClientSession,
        row: WebhookRow,
        sending: dict[str, asyncio.Task[None]],
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(self._deliver(session, row), name=f"webhook-{row.id}")

        def done(task: asyncio.Task[None]) -> None:
            sending.pop(row.url, None)
            if task.cancelled():
                return
            if task.exception() is not None:  # the next poll tries again
                log.error("webhook.send_crashed", delivery=row.id, error=repr(task.exception()))
            else:
                self._wake.set()  # the URL's next delivery may be due now

        task.add_done_callback(done)
        return task

    async def _deliver(self, session: aiohttp.ClientSession, row: WebhookRow) -> None:
        secret = self._secrets.get(row.url)
        if secret is None:  # abandoned at start; never signed without a key
            return
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "X-Deploy-Agent-Timestamp": str(timestamp),
            "X-Deploy-Agent-Signature": sign(secret, timestamp, row.body),
            "X-Deploy-Agent-Delivery": str(row.id),
        }
        status, error = None, None
        try:
            async with session.post(
                row.url, data=row.body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                if 300 <= status < 400:  # a POST redirected may arrive as a GET, or elsewhere
                    error = _redirect_error(response)
        except Exception as exc:  # any failure is recorded and retried with backoff
            error = _error_text(exc, row.url)
        if status is not None and 200 <= status < 300:
            await self._save(row, state="delivered", next_at=time.time(), status=status)
            return
        attempts = row.attempts + 1
        state = "failed" if attempts >= MAX_ATTEMPTS else "pending"
        delay = retry_delay(attempts)
        log.warning(
            "webhook.retry",
            url=redact_url(row.url),
            delivery=row.id,
            status=status,
            error=error,
            attempts=attempts,
            wait_s=round(delay, 1),
            gave_up=state == "failed",
        )
        await self._save(row, state=state, next_at=time.time() + delay, status=status, error=error)

    async def _save(
        self,
        row: WebhookRow,
        *,
        state: str,
        next_at: float,
        status: int | None,
        error: str | None = None,
    ) -> None:
        """Record a delivery's result. If the store fails, the URL waits out a retry's
        delay before its next try (the same delivery, sent again: receivers tell a
        repeat by its X-Deploy-Agent-Delivery)."""
        try:
            await self._store.webhook_result(
                row.id, state=state, next_at=next_at, status=status, error=error
            )
        except sqlite3.Error as exc:
            wait = retry_delay(row.attempts + 1)
            self._not_before[row.url] = time.time() + wait
            log.error(
                "webhook.result_not_saved",
                url=redact_url(row.url),
                delivery=row.id,
                error=repr(exc),
                wait_s=round(wait, 1),
            )
        else:
            self._not_before.pop(row.url, None)

    async def abandon_removed(self) -> None:
        """Deliveries queued for a URL the config no longer lists are not sent: the operator
        removed that receiver, and there is no secret left to sign them with."""
        dropped = await self._store.abandon_webhooks(list(self._secrets), NOT_CONFIGURED)
        if dropped:
            log.warning("webhook.dropped", deliveries=dropped, reason="url_not_configured")


def _redirect_error(response: aiohttp.ClientResponse) -> str:
    target = response.headers.get("Location", "")
    return (
        f"redirected to {redact_url(target)}: webhooks are not sent on to another URL "
        "(a POST may arrive as a GET there); configure the URL it names"
    )


def _error_text(exc: BaseException, url: str) -> str:
    """What went wrong, for the delivery's record and the log: with the URL's
    credentials masked, should the error quote it."""
    text = f"{type(exc).__name__}: {exc}"
    return text.replace(url, redact_url(url))[:300]
