"""The worker's puller against a scripted engine: every order gets exactly one answer that
the leader can read, whatever the engine says."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from agent import wire
from agent.engine import Engine, PushProgress
from agent.errors import RegistryError
from agent.worker.puller import Puller

IMAGE = "registry.test/acme/web@sha256:" + "a" * 64
PROXY_PAGE = "<html>" + "502 Bad Gateway " * 5000 + "</html>"


class ScriptedEngine:
    """An engine without the image, whose pull reports progress and then raises `error`."""

    def __init__(self, error: BaseException | None, status: str = "Downloading") -> None:
        self.error = error
        self.status = status
        self.pulled = asyncio.Event()  # set by a test to let a pull under way go on
        self.pulled.set()

    async def image_id(self, image: str) -> str | None:
        return None

    async def pull(self, image: str, credentials: Any, progress: Any) -> None:
        await self.pulled.wait()
        await progress(PushProgress(layer="l" * 9000, status=self.status, current=1, total=2))
        if self.error is not None:
            raise self.error


async def _answers(engine: ScriptedEngine, *orders: str) -> list[wire.ToLeader]:
    """What the leader receives for `orders` of one image, given one after the other while
    the first pull waits; decoded as the leader decodes it."""
    sent: list[wire.ToLeader] = []

    async def send(message: wire.ToLeader) -> None:
        sent.append(wire.decode_for_leader(wire.encode(message)))

    puller = Puller(
        cast(Engine, engine), parallel=1, retry_budget=0, credentials=lambda: None, send=send
    )
    for order in orders or ("d-1",):
        puller.order(order, IMAGE)
        await asyncio.sleep(0.01)
    engine.pulled.set()
    for _ in range(100):
        if sum(isinstance(m, wire.PullResult) for m in sent) == len(orders or ("d-1",)):
            break
        await asyncio.sleep(0.01)
    await puller.close()
    return sent


async def test_a_registry_error_longer_than_a_wire_field_still_reaches_the_leader() -> None:
    """An engine error carrying a proxy's whole error page is cut to fit, with a marker,
    instead of making the leader refuse the message and drop the link."""
    sent = await _answers(ScriptedEngine(RegistryError(PROXY_PAGE), status=PROXY_PAGE))
    progress = [m for m in sent if isinstance(m, wire.PullProgress)]
    [result] = [m for m in sent if isinstance(m, wire.PullResult)]
    assert len(progress) == 1 and len(progress[0].status) <= wire.TEXT_LIMIT
    assert not result.ok and result.error is not None
    assert result.error.startswith("<html>502 Bad Gateway")
    assert result.error.endswith(f"({len(PROXY_PAGE) - wire.TEXT_LIMIT + 64} characters cut)")


async def test_an_unexpected_failure_still_answers_the_order() -> None:
    """A bug in the pull path answers the order as failed rather than leaving the leader
    waiting for the stage deadline."""
    sent = await _answers(ScriptedEngine(KeyError("Status")))
    [result] = [m for m in sent if isinstance(m, wire.PullResult)]
    assert not result.ok and result.error is not None and "KeyError" in result.error


def test_short_texts_pass_unchanged() -> None:
    assert wire.clip("manifest unknown") == "manifest unknown"
    assert wire.clip("x" * wire.TEXT_LIMIT) == "x" * wire.TEXT_LIMIT


async def test_an_order_that_joins_a_pull_under_way_gets_its_progress_and_its_answer() -> None:
    """A deployment's order for an image the worker is already pulling from a Sync shows
    the pull's progress under the deployment's own order, not only under the Sync's."""
    engine = ScriptedEngine(None)
    engine.pulled.clear()
    sent = await _answers(engine, wire.SYNC_ORDER, "d-7", "d-7")
    progress = sorted(m.order for m in sent if isinstance(m, wire.PullProgress))
    results = sorted((m.order, m.ok) for m in sent if isinstance(m, wire.PullResult))
    assert progress == ["d-7", wire.SYNC_ORDER]
    assert results == [("d-7", True), ("d-7", True), (wire.SYNC_ORDER, True)]
