"""The worker's side of the link, against a real websocket server on loopback: how fast it
knocks again after a leader closed the link, and what it sends back."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from agent import wire
from agent.backoff import Backoff
from agent.config import parse_config
from agent.engine import Engine
from agent.errors import ConfigError
from agent.tls import LeaderTLS, ensure_leader_tls, make_join_token, new_secret
from agent.worker.agent import Worker, _pace_after_close
from agent.worker.identity import IDENTITY_FILE, EnrolmentError, Identity, enrol, load_identity
from tests.support.loopback import serving

IMAGE = "registry.test/acme/web@sha256:" + "a" * 64


DROP = -1  # no close frame: the connection is cut


class ClosingLeader:
    """Accepts each link, waits for the worker's hello, then closes it with `code` (or
    cuts the connection, for DROP)."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.links = 0

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.links += 1
        await ws.receive(timeout=5)
        if self.code == DROP:
            assert request.transport is not None
            request.transport.abort()
        else:
            await ws.close(code=self.code)
        return ws


def _worker(tmp_path: Path, url: str) -> Worker:
    config = parse_config(
        {
            "role": "worker",
            "state_dir": str(tmp_path),
            "engine": {"url": f"unix://{tmp_path}/no-engine.sock"},
            "worker": {"leader_url": url},
        }
    )
    return Worker(config)


async def _links_within(
    code: int, tmp_path: Path, seconds: float, enrolled_with: str | None = None
) -> int:
    """How many links the worker opens in `seconds` to a leader that closes each with
    `code`; the worker enrolled with the leader at `enrolled_with` (default: the same)."""
    leader = ClosingLeader(code)
    async for url in serving(leader.handler, wire.AGENT_PATH):
        worker = _worker(tmp_path, url)
        identity = Identity(node_id="n-1", secret="s", leader_url=enrolled_with or url, ca_pem=None)
        stop = asyncio.Event()
        loop = asyncio.create_task(worker._link_loop(identity, stop))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.wait_for(loop, 5)
        await worker.engine.close()
    return leader.links


@pytest.mark.parametrize("code", [wire.CLOSE_REPLACED, wire.CLOSE_BAD_MESSAGE])
async def test_a_link_closed_as_futile_waits_at_the_backoff_cap(code: int, tmp_path: Path) -> None:
    """Replaced by another agent with this identity, or messages neither side can read:
    the next try waits 15 to 30 s, not the half second of a fresh backoff."""
    assert await _links_within(code, tmp_path, 3.0) == 1


@pytest.mark.parametrize("code", [wire.CLOSE_SHUTDOWN, DROP], ids=["closed", "dropped"])
async def test_a_link_ended_at_once_does_not_start_the_backoff_over(
    code: int, tmp_path: Path
) -> None:
    """A leader that accepts each link and closes it, or cuts it, at once gets tries at
    a doubling delay (0.25-0.5 s, 0.5-1 s, 1-2 s...), not one every half second."""
    assert 2 <= await _links_within(code, tmp_path, 2.5) <= 4


async def test_the_worker_follows_the_leader_url_of_its_config(tmp_path: Path) -> None:
    """Enrolled with a leader that has since moved: the config's URL is the one used."""
    gone = "http://127.0.0.1:9"  # discard port: nothing listens
    assert await _links_within(wire.CLOSE_SHUTDOWN, tmp_path, 1.0, enrolled_with=gone) >= 1


class OrderingLeader:
    """Sends one pull order after the worker's hello, then records what comes back."""

    def __init__(self) -> None:
        self.received: list[wire.ToLeader] = []
        self.closed_at: float | None = None

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive(timeout=5)  # hello
        creds = wire.WireCredentials(version=0)
        await ws.send_str(wire.encode(wire.PullOrder(order="d-1", image=IMAGE, credentials=creds)))
        async for msg in ws:
            self.received.append(wire.decode_for_leader(msg.data))
        self.closed_at = time.monotonic()
        return ws


class SlowEngine:
    """An engine that takes `seconds` to pull any image."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def image_id(self, image: str) -> str | None:
        return None

    async def pull(self, image: str, credentials: Any, progress: Any) -> None:
        await asyncio.sleep(self.seconds)


async def test_a_stopping_worker_finishes_the_pull_under_way_and_answers_it(
    tmp_path: Path,
) -> None:
    """SIGTERM during a pull: the link stays up until the pull is done and answered,
    then closes; the leader has its answer instead of a dropped link."""
    leader = OrderingLeader()
    async for url in serving(leader.handler, wire.AGENT_PATH):
        worker = _worker(tmp_path, url)
        worker.puller._engine = cast(Engine, SlowEngine(1.5))
        identity = Identity(node_id="n-1", secret="s", leader_url=url, ca_pem=None)
        stop = asyncio.Event()
        loop = asyncio.create_task(worker._link_loop(identity, stop))
        await asyncio.sleep(0.5)  # the order is in and its pull under way
        stop.set()
        stopped_at = time.monotonic()
        await asyncio.wait_for(loop, 10)
        await worker.engine.close()

    answers = [m for m in leader.received if isinstance(m, wire.PullResult)]
    assert [(a.order, a.ok) for a in answers] == [("d-1", True)]
    assert leader.closed_at is not None and leader.closed_at - stopped_at < 3


@pytest.mark.parametrize(
    ("code", "up_s", "next_at_most"),
    [
        (1006, 6.0, 0.5),  # held, then lost (no close frame: a cut): try again at once
        (wire.CLOSE_SHUTDOWN, 6.0, 0.5),  # held, then closed: the leader restarts
        (wire.CLOSE_SHUTDOWN, 1.0, 30.0),  # closed by the leader at once: keep growing
        (1006, 1.0, 30.0),  # cut at once (a leader dropping every link): keep growing
    ],
)
def test_what_a_close_does_to_the_pace_of_the_next_tries(
    code: int, up_s: float, next_at_most: float
) -> None:
    backoff = Backoff(initial=0.5, cap=30)
    for _ in range(6):
        backoff.next()
    _pace_after_close(backoff, code, up_s)
    delay = backoff.next()
    assert delay <= next_at_most
    assert next_at_most < 1 or delay >= 8  # kept growing: 16 to 32 s, capped at 30


class ListeningLeader:
    """Records the credentials each link attempt brings, and closes the link."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        self.authorizations.append(request.headers.get("Authorization", ""))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close(code=wire.CLOSE_SHUTDOWN)
        return ws


async def _tls_site(leader: ListeningLeader, tls: LeaderTLS) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get(wire.AGENT_PATH, leader.handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context())
    await site.start()
    return runner, f"https://127.0.0.1:{runner.addresses[0][1]}"


async def _link_for(worker: Worker, identity: Identity, seconds: float) -> None:
    """Run the worker's link loop for `seconds`; raise what ended it sooner."""
    stop = asyncio.Event()
    loop = asyncio.create_task(worker._link_loop(identity, stop))
    try:
        done, _ = await asyncio.wait([loop], timeout=seconds)
        if done:
            loop.result()
    finally:
        stop.set()
        if not loop.done():
            await asyncio.wait_for(loop, 5)
        await worker.engine.close()


async def test_an_https_leader_with_no_pinned_ca_is_verified_not_trusted(tmp_path: Path) -> None:
    """A node enrolled over plain HTTP (nothing pinned) whose config now names an https
    leader checks its certificate against the system's CAs: a leader with a certificate
    of its own CA is refused, and never sees the node secret."""
    leader = ListeningLeader()
    runner, url = await _tls_site(leader, ensure_leader_tls(tmp_path / "tls", ["127.0.0.1"]))
    try:
        identity = Identity(node_id="n-1", secret="s3cret", leader_url="http://old", ca_pem=None)
        await _link_for(_worker(tmp_path, url), identity, 1.5)
    finally:
        await runner.cleanup()
    assert leader.authorizations == []


async def test_a_pinned_ca_verifies_the_leader_it_names(tmp_path: Path) -> None:
    """The CA pinned at enrolment verifies the leader: the link is made (the test above
    is refused for its missing pin, not for a broken server)."""
    leader = ListeningLeader()
    tls = ensure_leader_tls(tmp_path / "tls", ["127.0.0.1"])
    runner, url = await _tls_site(leader, tls)
    try:
        identity = Identity(
            node_id="n-1", secret="s3cret", leader_url=url, ca_pem=tls.ca_file.read_text()
        )
        await _link_for(_worker(tmp_path, url), identity, 1.0)
    finally:
        await runner.cleanup()
    assert leader.authorizations[:1] == ["Node n-1:s3cret"]


async def test_a_node_enrolled_over_tls_refuses_a_plain_http_leader(tmp_path: Path) -> None:
    """Its config moved to an http:// URL: the worker stops with an error that says so,
    and the node secret is never sent in clear."""
    leader = ListeningLeader()
    tls = ensure_leader_tls(tmp_path / "tls", ["127.0.0.1"])
    async for url in serving(leader.handler, wire.AGENT_PATH):
        identity = Identity(
            node_id="n-1", secret="s3cret", leader_url="https://old", ca_pem=tls.ca_file.read_text()
        )
        with pytest.raises(ConfigError, match="plain HTTP"):
            await _link_for(_worker(tmp_path, url), identity, 2.0)
    assert leader.authorizations == []


class OversizeLeader:
    """Sends one message over the worker's 4 MiB limit after its hello."""

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive(timeout=5)
        await ws.send_str("x" * (5 * 1024 * 1024))
        await ws.receive(timeout=5)  # the worker's close
        return ws


async def test_a_link_the_worker_ends_for_a_fault_logs_why(tmp_path: Path) -> None:
    """A message over the size limit ends the link (1009), and the log says what the
    fault was, so flapping links can be told apart from network cuts."""
    leader = OversizeLeader()
    async for url in serving(leader.handler, wire.AGENT_PATH):
        identity = Identity(node_id="n-1", secret="s", leader_url=url, ca_pem=None)
        with capture_logs() as logs:
            await _link_for(_worker(tmp_path, url), identity, 1.0)
    faults = [e["error"] for e in logs if e["event"] == "link.fault"]
    closed = [e["code"] for e in logs if e["event"] == "link.closed"]
    assert closed[:1] == [1009], logs
    assert faults and "size" in faults[0], logs


JOIN_TOKEN = make_join_token("0" * 64, new_secret())


def _answering(status: int, body: str, content_type: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body, content_type=content_type)

    return handler


JOIN_ANSWERS = {
    "proxy-error-page": (
        502,
        "<html><body>502 Bad Gateway</body></html>",
        "text/html",
        "answered 502 Bad Gateway with no node identity",
    ),
    "refused-with-hint": (
        401,
        '{"error": {"code": "unauthorized", "message": "the join token is not valid",'
        ' "hint": "get the current token with `deploy-agent join-token`"}}',
        "application/json",
        "the join token is not valid (get the current token",
    ),
    "not-an-identity": (201, '{"ok": true}', "application/json", "no node identity"),
    "proxy-rate-limit": (
        429,
        '{"error": {"code": "rate_limited", "message": "slow down"}}',
        "application/json",
        "slow down",
    ),
}


@pytest.mark.parametrize("case", JOIN_ANSWERS.keys())
async def test_a_join_that_fails_says_why(case: str) -> None:
    """Whatever answers the join (a proxy's page, the leader refusing, something else),
    enrolment fails with an error to act on, never a decoding traceback. Only the
    leader's refusal is a config error (exit 2, not restarted): a restart would meet it
    again until the token changes."""
    status, body, content_type, says = JOIN_ANSWERS[case]
    async for url in serving(_answering(status, body, content_type), "/v1/join"):
        with pytest.raises(EnrolmentError, match=re.escape(says)) as caught:
            await enrol(url, JOIN_TOKEN, "w-1", new_secret())
    assert isinstance(caught.value, ConfigError) is (case == "refused-with-hint")


async def test_a_malformed_join_token_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"worker\.join_token: the join token is malformed"):
        await enrol("http://127.0.0.1:9", "DAT1-not-a-token", "w-1", new_secret())


async def test_an_unreachable_leader_fails_enrolment_with_its_address() -> None:
    gone = "http://127.0.0.1:9"  # discard port: nothing listens
    with pytest.raises(
        EnrolmentError, match=re.escape(f"could not enrol with the leader at {gone}")
    ):
        await enrol(gone, JOIN_TOKEN, "w-1", new_secret())


def test_a_damaged_identity_file_names_itself(tmp_path: Path) -> None:
    """A node.json cut short (a full disk at the time, say) stops the worker with an
    error naming the file and what to do, not a decoding traceback."""
    (tmp_path / IDENTITY_FILE).write_text('{"node_id": "n-1", "sec')
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / IDENTITY_FILE} does not hold")):
        load_identity(tmp_path)


async def test_a_stop_does_not_wait_for_a_slow_handshake(tmp_path: Path) -> None:
    """SIGTERM while the leader is slow to answer the upgrade (15 s are allowed): the
    worker stops at once, instead of finishing the handshake and then draining, which
    could outlast the unit's stop timeout."""

    async def slow_upgrade(request: web.Request) -> web.WebSocketResponse:
        await asyncio.sleep(3)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        return ws

    async for url in serving(slow_upgrade, wire.AGENT_PATH):
        worker = _worker(tmp_path, url)
        identity = Identity(node_id="n-1", secret="s", leader_url=url, ca_pem=None)
        stop = asyncio.Event()
        loop = asyncio.create_task(worker._link_loop(identity, stop))
        await asyncio.sleep(0.5)
        stop.set()
        stopped_at = time.monotonic()
        await asyncio.wait_for(loop, 12)
        took = time.monotonic() - stopped_at
        await worker.engine.close()
    assert took < 1.0
