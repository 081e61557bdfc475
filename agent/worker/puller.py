"""Pulls images on the worker's engine: bounded concurrency, one pull per digest at a
time, transient errors retried with backoff. Every order gets exactly one answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_before_delay,
    wait_exponential_jitter,
)

from agent import wire
from agent.credentials import RegistryCredentials
from agent.engine import Engine, PushProgress
from agent.errors import EngineError, RegistryError, RegistryTransientError
from agent.logs import get_logger
from agent.progress import LayerThrottle
from agent.retention import prune_app_images
from agent.retrying import scoped

log = get_logger(__name__)
ORDER_MEMORY_S = 3600.0
Send = Callable[[wire.ToLeader], Awaitable[None]]
CredentialsSource = Callable[[], RegistryCredentials | None]


class Puller:
    def __init__(
        self,
        engine: Engine,
        *,
        parallel: int,
        retry_budget: float,
        credentials: CredentialsSource,
        send: Send,
    ) -> None:
        self._engine = engine
        self._slots = asyncio.Semaphore(parallel)
        self._retry_budget = retry_budget
        self._credentials = credentials
        self._send = send
        # by image: its pull, and the progress sink that knows the orders it answers
        self._inflight: dict[str, tuple[asyncio.Task[str | None], _Progress]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # by image: when it was last ordered (monotonic), so that a retention told before
        # an order spares that order's image
        self._ordered_at: dict[str, float] = {}

    @property
    def busy(self) -> int:
        """How many distinct images are being pulled now."""
        return len(self._inflight)

    def order(self, order: str, image: str) -> None:
        """Make sure `image` is present, then answer `order`; a duplicate joins the pull."""
        self._ordered_at[image] = time.monotonic()
        inflight = self._inflight.get(image)
        if inflight is None:
            progress = _Progress(image, self._send)
            task = asyncio.create_task(self._pull(image, progress), name=f"pull-{image}")
            inflight = self._inflight[image] = (task, progress)
            task.add_done_callback(lambda _: self._inflight.pop(image, None))
        pull, progress = inflight
        if order not in progress.orders:
            progress.orders.append(order)
        self._spawn(self._answer(order, image, pull, time.monotonic()), f"answer-{order}")

    def retain(self, app: str, keep: int, hold: list[str] | None) -> None:
        """Remove the app's old images (but those `hold` names, and those ordered from
        now on: the leader named its holdings before them) once a pull slot is free."""
        since = time.monotonic()
        self._spawn(self._retain(app, keep, hold, since), f"retain-{app}")

    async def _retain(self, app: str, keep: int, hold: list[str] | None, since: float) -> None:
        async with self._slots:
            spare = self._ordered_since(since)
            try:
                await prune_app_images(self._engine, app, keep, hold, spare)
            except EngineError as exc:
                log.warning("retention.failed", app=app, error=exc.message)

    def _ordered_since(self, since: float) -> list[str]:
        """The images ordered at or after `since`; forgets those ordered over an hour
        before it, which no retention told since then can still be waiting on."""
        for image, at in list(self._ordered_at.items()):
            if at < since - ORDER_MEMORY_S:
                del self._ordered_at[image]
        return [image for image, at in self._ordered_at.items() if at >= since]

    def inventory(self, query: str, images: list[str]) -> None:
        """Tell the leader which of `images` the engine holds (not behind the pulls)."""
        self._spawn(self._inventory(query, images), f"inventory-{query}")

    async def _inventory(self, query: str, images: list[str]) -> None:
        held = []
        for image in images:
            try:
                if await self._engine.image_id(image) is not None:
                    held.append(image)
            except EngineError as exc:  # no answer: the leader reports this node unknown
                log.warning("inventory.failed", image=image, error=exc.message)
                return
        await self._send(wire.Holding(query=query, images=held))

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(
        self, order: str, image: str, pull: asyncio.Task[str | None], started: float
    ) -> None:
        try:
            error = await asyncio.shield(pull)
        except Exception as exc:  # every order gets an answer, even after a bug
            log.exception("pull.crashed", image=image)
            error = f"the worker's pull failed unexpectedly: {exc!r}"
        error = wire.clip(error) if error is not None else None
        seconds = time.monotonic() - started
        log.info("pull.done", image=image, ok=error is None, error=error, seconds=round(seconds, 3))
        await self._send(
            wire.PullResult(
                order=order, image=image, ok=error is None, error=error, seconds=seconds
            )
        )

    async def _pull(self, image: str, progress: _Progress) -> str | None:
        """None when the image is present; otherwise the reason it is not."""
        async with self._slots:
            try:
                if await self._engine.image_id(image) is not None:
                    return None
                await self._pull_with_retries(image, progress)
            except (RegistryError, EngineError) as exc:
                return exc.message
        return None

    async def _pull_with_retries(self, image: str, progress: _Progress) -> None:
        with scoped(
            AsyncRetrying(
                stop=stop_before_delay(self._retry_budget),
                wait=wait_exponential_jitter(initial=1, max=15, jitter=1),
                retry=retry_if_exception(_transient),
                before_sleep=lambda state: log.warning(
                    "pull.retry",
                    image=image,
                    attempt=state.attempt_number,
                    error=str(state.outcome.exception() if state.outcome else ""),
                ),
                reraise=True,
            )
        ) as attempts:
            async for attempt in attempts:
                with attempt:
                    await self._engine.pull(image, self._credentials(), progress)

    async def drain(self, within: float) -> None:
        """Let the pulls under way finish and their orders be answered, for up to
        `within` seconds; orders that come meanwhile are waited for too."""
        if not self._tasks:
            return
        log.info("pull.draining", pulls=len(self._inflight), within_s=within)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self._tasks:
                    await asyncio.wait(list(self._tasks))
        log.info("pull.drained", left=len(self._tasks))

    async def close(self) -> None:
        pending = [*(pull for pull, _ in self._inflight.values()), *self._tasks]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _transient(exc: BaseException) -> bool:
    """Registry hiccups, and an engine that is restarting, are worth another try."""
    return isinstance(exc, RegistryTransientError) or (
        isinstance(exc, EngineError) and not isinstance(exc, RegistryError)
    )


class _Progress:
    """Sends the engine's pull progress to the leader, thinned out per layer, once for
    each order the pull answers (an order that joined a pull under way sees it too)."""

    def __init__(self, image: str, send: Send) -> None:
        self._image, self._send = image, send
        self.orders: list[str] = []
        self._throttle = LayerThrottle()

    async def __call__(self, progress: PushProgress) -> None:
        if not self._throttle.due(progress.layer, progress.status):
            return
        for order in list(self.orders):
            await self._send(
                wire.PullProgress(
                    order=order,
                    image=self._image,
                    layer=wire.clip(progress.layer),
                    status=wire.clip(progress.status),
                    current=progress.current,
                    total=progress.total,
                )
            )
