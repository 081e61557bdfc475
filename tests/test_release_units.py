"""The small parts releases rest on: image references, what the worker protocol carries to
each version, inventory rounds, and a worker's retention on a real engine."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from agent import wire
from agent.engine import Engine
from agent.errors import RequestError
from agent.leader.links.inventory import InventoriesInFlight
from agent.leader.registry.references import ImageReference, parse_reference
from agent.retention import APP_LABEL
from agent.worker.puller import Puller
from tests.support.contexts import busybox_context
from tests.support.dockerd import Dockerd

DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("ref", "parsed"),
    [
        ("reg.example:5000/ns/app:1.2", ("reg.example:5000/ns/app", "1.2", None)),
        ("reg.example:5000/ns/app", ("reg.example:5000/ns/app", None, None)),
        (f"reg.example/ns/app@{DIGEST}", ("reg.example/ns/app", None, DIGEST)),
        (f"localhost:5000/app:v1@{DIGEST}", ("localhost:5000/app", "v1", DIGEST)),
        ("app", ("app", None, None)),
    ],
)
def test_image_references_split_into_repository_tag_and_digest(
    ref: str, parsed: tuple[str, str | None, str | None]
) -> None:
    """A port is not a tag; a digest and a tag may both be given."""
    assert parse_reference(ref) == ImageReference(*parsed)


@pytest.mark.parametrize(
    "ref", ["App:1", "app:", "app:-x", "app@sha256:abc", "app@md5:" + "0" * 32, "/app", "a b"]
)
def test_invalid_image_references_are_refused_with_400(ref: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_reference(ref)
    assert caught.value.status == 400


def test_a_reference_prints_as_the_engine_takes_it() -> None:
    assert str(parse_reference("r/app")) == "r/app:latest"
    assert str(parse_reference(f"r/app:1@{DIGEST}")) == f"r/app@{DIGEST}"


def test_protocol_1_workers_get_retain_without_hold_and_no_inventory() -> None:
    """What this release added to the link is left out for the previous release's
    workers: they keep their newest images by date, and are never asked what they hold."""
    retain = wire.Retain(app="a", keep=2, hold=["r/a@" + DIGEST])
    assert json.loads(wire.encode_for(retain, 1) or "") == {
        "type": "retain",
        "v": 1,
        "app": "a",
        "keep": 2,
    }
    assert json.loads(wire.encode_for(retain, 2) or "")["hold"] == ["r/a@" + DIGEST]
    assert wire.encode_for(wire.Inventory(query="q", images=["x"]), 1) is None
    assert not wire.known_to(wire.Inventory, 1)
    assert wire.known_to(wire.Inventory, 2) and wire.known_to(wire.Retain, 1)
    holding = wire.Holding(query="q", images=["x"])
    assert wire.decode_for_leader(wire.encode(holding)) == holding


async def test_an_inventory_round_settles_on_answers_and_dropped_links() -> None:
    """A round resolves once each asked node answered or lost its link; only answers
    count as knowledge, and an answer to another round or a second one is ignored."""
    rounds = InventoriesInFlight()
    asked = rounds.open({"n1", "n2"})
    rounds.answer("n1", wire.Holding(query="another", images=["x"]))
    rounds.answer("n1", wire.Holding(query=asked.query, images=["x"]))
    rounds.answer("n1", wire.Holding(query=asked.query, images=[]))
    assert not asked.settled.done()

    rounds.drop("n2")

    await asyncio.wait_for(asked.settled, 1)
    assert asked.answers == {"n1": frozenset({"x"})}
    rounds.close(asked)


async def test_a_worker_keeps_what_it_is_told_to_hold_and_what_was_ordered_since(
    dockerd: Dockerd, tmp_path: Path
) -> None:
    """Retention on a worker: of an app's three images, the one named in `hold` stays,
    and so does one ordered after the Retain arrived (a deployment that pushed after the
    leader named its holdings); the third goes. Asked, it names what it holds."""
    images = []
    for name in ("held", "dropped", "ordered"):
        tag = f"unit-retain:{name}"
        ctx = busybox_context(tmp_path / name)
        dockerd.cli("build", "-q", "--label", f"{APP_LABEL}=unit-retain", "-t", tag, str(ctx))
        images.append(tag)
    sent: list[wire.ToLeader] = []

    async def send(message: wire.ToLeader) -> None:
        sent.append(message)

    engine = Engine(dockerd.url, timeout=30)
    puller = Puller(engine, parallel=1, retry_budget=1, credentials=lambda: None, send=send)
    try:
        puller.retain("unit-retain", 1, [images[0]])
        puller.order("d-later", images[2])
        await puller.drain(30)
        puller.inventory("q1", images)
        await puller.drain(30)
    finally:
        await puller.close()
        await engine.close()

    held = [image for image in images if await _holds(dockerd, image)]
    assert held == [images[0], images[2]]
    assert wire.Holding(query="q1", images=held) in sent


async def _holds(engine: Dockerd, image: str) -> bool:
    done = await asyncio.to_thread(engine.cli, "image", "inspect", image, check=False)
    return done.returncode == 0
