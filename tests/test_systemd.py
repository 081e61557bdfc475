"""The notify protocol: a real leader process tells a listening "systemd" it is ready,
feeds the watchdog, reports its status and says it is stopping; a blocked loop starves
the watchdog."""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.systemd import Notifier, socket_address, watchdog_interval
from tests.support.leader import LeaderProcess
from tests.support.notify import NotifyListener


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    sock = NotifyListener(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[NotifyListener]:
    sock = NotifyListener(f"@deploy-agent-test-{secrets.token_hex(4)}")
    yield sock
    sock.close()


async def test_leader_process_is_ready_feeds_the_watchdog_and_says_it_stops(
    leader_process: Callable[..., LeaderProcess], abstract_listener: NotifyListener
) -> None:
    """READY=1 with a status once serving, WATCHDOG=1 every half interval, STOPPING=1 on
    SIGTERM with the time the stop may take (so systemd waits out the drain whatever the
    unit's TimeoutStopSec), then a clean exit."""
    leader = leader_process(leader={"drain_timeout": 7})
    leader.start(env={"NOTIFY_SOCKET": abstract_listener.address, "WATCHDOG_USEC": "400000"})

    ready = (await abstract_listener.wait_for("READY=1"))[0]
    status = ready.status()
    assert status is not None and status.startswith("leader serving http://127.0.0.1:"), status
    pings = await abstract_listener.wait_for("WATCHDOG=1", count=5, timeout=20)
    assert pings[-1].at - pings[0].at < 10  # about every 0.2 s, not once in a while
    assert leader.proc is not None
    leader.proc.send_signal(signal.SIGTERM)
    stopping = (await abstract_listener.wait_for("STOPPING=1", timeout=20))[0]
    assert leader.proc.wait(30) == 0

    assert [m for m in abstract_listener.messages if m.has("READY=1")] == [ready]
    assert ready.at < stopping.at
    assert (stopping.status() or "").startswith("stopping; leader serving")
    # 7 s of drain, 20 s for an interrupted release to undo itself, 15 s to close
    assert stopping.has("EXTEND_TIMEOUT_USEC=42000000"), stopping.fields
    assert "leader starting" in abstract_listener.statuses()


async def test_watchdog_pings_stop_while_the_event_loop_is_blocked(
    listener: NotifyListener,
) -> None:
    """With the loop blocked for 2 s no ping leaves; pings come on both sides of it."""
    notifier = Notifier(listener.address, watchdog_every=0.1)
    async with notifier.pulse(asyncio.Event(), lambda: "busy"):
        await asyncio.sleep(0.6)
        blocked_from = time.monotonic()
        time.sleep(2.0)  # a handler that blocks the loop: what the watchdog must catch
        blocked_until = time.monotonic()
        await asyncio.sleep(0.6)
    notifier.close()
    await asyncio.sleep(0.1)  # let the listener's thread take the last datagrams

    pings = [m.at for m in listener.with_field("WATCHDOG=1")]
    # a ping sent just before the block may arrive a little late: allow it half a second
    assert [t for t in pings if blocked_from + 0.5 < t < blocked_until] == []
    assert any(t < blocked_from for t in pings)
    assert any(t >= blocked_until for t in pings)
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) >= 1.5


async def test_status_follows_readiness_and_stopping_is_said_once(listener: NotifyListener) -> None:
    """No periodic status before READY=1; after it the summary is sent when it changes;
    STOPPING=1 goes out once when the stop event is set, and pings go on after it."""
    notifier = Notifier(listener.address, watchdog_every=0.05)
    stop = asyncio.Event()
    async with notifier.pulse(stop, lambda: "steady"):
        await asyncio.sleep(0.2)
        assert listener.statuses() == []
        notifier.ready("ready 0")
        await asyncio.sleep(0.2)
        stop.set()
        await listener.wait_for("STOPPING=1", timeout=5)
        await asyncio.sleep(0.2)
    notifier.close()
    await asyncio.sleep(0.1)

    assert listener.statuses() == ["ready 0", "steady", "stopping; steady"]
    assert len(listener.with_field("STOPPING=1")) == 1
    assert not [f for m in listener.messages for f in m.fields if f.startswith("EXTEND_")]
    stopped_at = listener.with_field("STOPPING=1")[0].at
    assert any(m.at > stopped_at for m in listener.with_field("WATCHDOG=1"))


def test_environment_is_read_as_systemd_sets_it() -> None:
    """`@` names an abstract socket; the watchdog interval is half of WATCHDOG_USEC and
    only for the process WATCHDOG_PID names."""
    assert socket_address("@name") == "\0name"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid())}) == 0.0005
    assert watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None
    assert not Notifier.from_environ({}).enabled


def test_a_vanished_manager_never_stops_the_agent(tmp_path: Path) -> None:
    """Sending to a socket nobody listens on is logged once, not raised."""
    notifier = Notifier(str(tmp_path / "gone.sock"), watchdog_every=1.0)
    with capture_logs() as logs:
        notifier.ready("ready")
        notifier.status("still here")
    notifier.close()
    assert [e["event"] for e in logs] == ["systemd.notify_failed"]
