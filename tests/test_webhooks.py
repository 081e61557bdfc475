"""Webhooks: signed state changes reach a real receiver, in order, through failures and
across a leader restart."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from agent.config import WebhookConfig
from agent.leader.state.store import Store, WebhookRow
from agent.leader.webhooks import WebhookSender
from tests.support.contexts import busybox_context
from tests.support.procs import free_port

SECRET = "webhook-secret-0123456789"


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """How a receiver checks a delivery (docs/webhooks.md shows the same)."""
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest("sha256=" + expected.hexdigest(), signature)


class Receiver:
    def __init__(self, fail_first: int = 0, answer_after: float = 0.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.fail_first = fail_first
        self.answer_after = answer_after
        self.seen: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ok = verify(
            SECRET,
            request.headers["X-Deploy-Agent-Timestamp"],
            body,
            request.headers["X-Deploy-Agent-Signature"],
        )
        self.bad_signatures += not ok
        await asyncio.sleep(self.answer_after)
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=500)
        self.seen.append(json.loads(body))
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, count: int, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while len(self.seen) < count:
                await asyncio.sleep(0.1)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    made = Receiver(fail_first=2)
    yield made
    await made.stop()


async def test_state_changes_are_delivered_signed_and_in_order_through_failures(
    leader_factory: Callable[..., Any], receiver: Receiver, tmp_path: Path
) -> None:
    """With the receiver failing twice, every state change still arrives, in order."""
    await receiver.start()
    leader = await leader_factory(leader={"webhooks": [{"url": receiver.url, "secret": SECRET}]})
    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "hooked")
    await leader.api.wait_final(dep["id"])

    await receiver.wait_for(3)

    assert [d["state"] for d in receiver.seen] == ["queued", "building", "succeeded"]
    assert {d["deployment"] for d in receiver.seen} == {dep["id"]}
    assert receiver.bad_signatures == 0
    status, doc = await leader.api.request("GET", f"/v1/deployments/{dep['id']}/webhooks")
    assert status == 200
    deliveries = doc["webhooks"]
    assert [d["state"] for d in deliveries] == ["delivered"] * 3
    assert deliveries[0]["attempts"] == 3
    assert deliveries[0]["last_status"] == 204


async def test_a_slow_receiver_does_not_hold_up_another(
    leader_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """One receiver takes 8 s per delivery (within the 10 s limit); the other still gets
    every state change as it happens, not one per slow answer."""
    slow, fast = Receiver(answer_after=8.0), Receiver()
    await slow.start()
    await fast.start()
    try:
        hooks = [{"url": r.url, "secret": SECRET} for r in (slow, fast)]
        leader = await leader_factory(leader={"webhooks": hooks})
        dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "hooked")
        await leader.api.wait_final(dep["id"])
        await fast.wait_for(3, timeout=4)
    finally:
        await slow.stop()
        await fast.stop()

    assert [d["state"] for d in fast.seen] == ["queued", "building", "succeeded"]
    assert len(slow.seen) < 3  # still working through its queue, one per 8 s


async def test_undelivered_webhooks_survive_a_leader_restart(
    leader_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """Deliveries pending when the leader stops are made by the next leader."""
    receiver = Receiver()
    hooks = {"webhooks": [{"url": receiver.url, "secret": SECRET}]}
    first = await leader_factory(leader=hooks)
    dep = await first.api.deploy_dir(busybox_context(tmp_path / "c"), "later")
    await first.api.wait_final(dep["id"])
    _, doc = await first.api.request("GET", f"/v1/deployments/{dep['id']}/webhooks")
    assert {d["state"] for d in doc["webhooks"]} == {"pending"}
    await first.stop()

    await receiver.start()
    try:
        second = await leader_factory(state_dir=first.config.state_dir, leader=hooks)
        await receiver.wait_for(3)
    finally:
        await receiver.stop()
    assert [d["state"] for d in receiver.seen] == ["queued", "building", "succeeded"]
    _, doc = await second.api.request("GET", f"/v1/deployments/{dep['id']}/webhooks")
    assert {d["state"] for d in doc["webhooks"]} == {"delivered"}


async def test_deliveries_to_a_url_removed_from_the_config_are_dropped_unsent(
    leader_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A receiver the operator removed gets nothing after the restart: its pending
    deliveries are marked failed, not sent (they could only be signed with no secret)."""
    retired = Receiver()
    first = await leader_factory(leader={"webhooks": [{"url": retired.url, "secret": SECRET}]})
    dep = await first.api.deploy_dir(busybox_context(tmp_path / "c"), "retired")
    await first.api.wait_final(dep["id"])
    await first.stop()

    await retired.start()
    try:
        second = await leader_factory(state_dir=first.config.state_dir, leader={"webhooks": []})
        async with asyncio.timeout(30):
            while True:
                _, doc = await second.api.request("GET", f"/v1/deployments/{dep['id']}/webhooks")
                if {d["state"] for d in doc["webhooks"]} == {"failed"}:
                    break
                await asyncio.sleep(0.2)
    finally:
        await retired.stop()
    assert retired.seen == [] and retired.bad_signatures == 0
    assert all("no longer" in d["last_error"] for d in doc["webhooks"])


class Redirecting(Receiver):
    """A receiver that sends every delivery on to another path of its own, as an
    http-to-https or moved-endpoint redirect would."""

    def __init__(self, location: str = "/landing") -> None:
        super().__init__()
        self.location = location
        self.landed: list[str] = []  # the methods that reached the redirect's target

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": self.location})

    async def landing(self, request: web.Request) -> web.Response:
        self.landed.append(request.method)
        return web.Response(status=200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        app.router.add_route("*", "/landing", self.landing)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()


@pytest.mark.parametrize(
    ("location", "named"), [("/landing", "/landing"), ("http://[oops", "(an unreadable URL)")]
)
async def test_a_redirect_is_not_followed_nor_counted_as_delivered(
    leader_factory: Callable[..., Any], tmp_path: Path, location: str, named: str
) -> None:
    """A 302 turns a POST into a bodyless GET: followed, the event was lost yet recorded
    as delivered, and its signature went to whatever host the redirect named. A target
    that is no URL at all is a failure like any other, recorded and retried."""
    receiver = Redirecting(location)
    await receiver.start()
    try:
        hooks = [{"url": receiver.url, "secret": SECRET}]
        leader = await leader_factory(leader={"webhooks": hooks})
        dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "moved")
        await leader.api.wait_final(dep["id"])
        async with asyncio.timeout(20):
            while True:
                _, doc = await leader.api.request("GET", f"/v1/deployments/{dep['id']}/webhooks")
                first = doc["webhooks"][0]
                if first["attempts"] >= 1:
                    break
                await asyncio.sleep(0.1)
    finally:
        await receiver.stop()

    assert first["state"] == "pending"
    assert first["last_status"] == 302
    assert f"redirected to {named}" in first["last_error"]
    assert receiver.landed == []


async def test_a_webhook_url_credentials_are_not_shown(
    leader_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A receiver's URL may carry a credential (user and password, a token in the query
    string): neither the retry's log line nor the API's answer shows it."""
    receiver = Receiver(fail_first=1)
    await receiver.start()
    url = receiver.url.replace("http://", "http://hook:PW-S3CRET@") + "?token=Q-S3CRET"
    try:
        leader = await leader_factory(leader={"webhooks": [{"url": url, "secret": SECRET}]})
        with capture_logs() as logs:
            dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "masked")
            await leader.api.wait_final(dep["id"])
            await receiver.wait_for(3)
        _, doc = await leader.api.request("GET", f"/v1/deployments/{dep['id']}/webhooks")
    finally:
        await receiver.stop()

    retries = [e for e in logs if e["event"] == "webhook.retry"]
    assert retries
    shown = json.dumps([retries, doc])
    assert "S3CRET" not in shown
    assert f"http://***@127.0.0.1:{receiver.port}/hook?***" in shown


class FailingStore:
    """The sender's side of the store, failing as a full disk would: its first poll,
    then every result it is given to save (the row therefore stays due)."""

    def __init__(self, row: WebhookRow) -> None:
        self.row = row
        self.polls = 0

    async def due_webhooks(self, now: float) -> list[WebhookRow]:
        self.polls += 1
        if self.polls == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return [self.row]

    async def webhook_result(self, row_id: int, **_: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")


async def test_a_store_that_fails_neither_stops_the_sender_nor_makes_it_resend_at_once() -> None:
    """A failed poll is tried again; a result that could not be saved leaves its row
    due, and the URL then waits a retry's delay (16 s or more after 5 attempts) instead
    of being sent the same delivery at every 1 s poll."""
    receiver = Receiver()
    await receiver.start()
    row = WebhookRow(1, "d-1", receiver.url, b'{"state": "queued"}', attempts=5, next_at=0.0)
    store = FailingStore(row)
    sender = WebhookSender(cast(Store, store), (WebhookConfig(url=receiver.url, secret=SECRET),))
    task = asyncio.create_task(sender.run())
    try:
        await receiver.wait_for(1, timeout=5)
        await asyncio.sleep(3.5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await receiver.stop()

    assert store.polls >= 3  # it went on polling after the first one failed
    assert len(receiver.seen) == 1
