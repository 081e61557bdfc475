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
import time

import aiohttp

from agent.config import WebhookConfig
from agent.leader.store import Store, WebhookRow
from agent.logs import get_logger

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
                    for row in await self._store.due_webhooks(time.time()):
                        if row.url not in sending:
                            sending[row.url] = self._start(session, row, sending)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(IDLE_POLL):
                            await self._wake.wait()
            finally:
                for task in sending.values():
                    task.cancel()
                await asyncio.gather(*sending.values(), return_exceptions=True)

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
            async with session.post(row.url, data=row.body, headers=headers) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = repr(exc)[:300]
        if status is not None and 200 <= status < 300:
            await self._store.webhook_result(
                row.id, state="delivered", next_at=time.time(), status=status, error=None
            )
            return
        attempts = row.attempts + 1
        state = "failed" if attempts >= MAX_ATTEMPTS else "pending"
        delay = retry_delay(attempts)
        log.warning(
            "webhook.retry",
            url=row.url,
            delivery=row.id,
            status=status,
            error=error,
            attempts=attempts,
            wait_s=round(delay, 1),
            gave_up=state == "failed",
        )
        await self._store.webhook_result(
            row.id, state=state, next_at=time.time() + delay, status=status, error=error
        )

    async def abandon_removed(self) -> None:
        """Deliveries queued for a URL the config no longer lists are not sent: the operator
        removed that receiver, and there is no secret left to sign them with."""
        dropped = await self._store.abandon_webhooks(list(self._secrets), NOT_CONFIGURED)
        if dropped:
            log.warning("webhook.dropped", deliveries=dropped, reason="url_not_configured")
