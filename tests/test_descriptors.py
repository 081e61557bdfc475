"""A leader gives back every file descriptor and every connection to its engine: after
300 local-mode deployments (builds that succeed, builds that fail, builds cancelled while
they run), its open descriptors and its Unix-socket connections to the engine return to
what they were before the run, within 5.

The leader is a real `deploy-agent run` process, read from outside through
/proc/PID/fd; its connections to the engine are the sockets among those descriptors whose
peer is the engine's socket (`ss -x`). The contexts are a Dockerfile on top of a busybox
base image built before, so the run measures the leader's handling of streams, cancels and
retention rather than uploads (a build given up mid-upload is test_engine_deadlines'
case). The engine's idle keep-alive connections close within aiohttp's keep-alive time
(15 to 30 s): the "after" figures are read until they are back in range, for at most
that long; a leak never comes back.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.api import Api, tar_of
from tests.support.contexts import busybox_context
from tests.support.dockerd import Dockerd
from tests.support.leader import LeaderProcess

DEPLOYMENTS = 300
LANES = 10  # apps deployed side by side, each one deployment after another
TOLERANCE = 5
SETTLE_S = 40.0  # aiohttp closes an idle keep-alive connection within 15 to 30 s
SAMPLE_S = 0.5
# Of every ten deployments: six succeed (two with a new image, four served from the
# build cache), two fail (a missing file, a Dockerfile the engine cannot read), two
# are cancelled (one as soon as it is building, one while its build runs a command).
KINDS = (
    "new_image",
    "cached",
    "missing_file",
    "cached",
    "cancel_at_start",
    "new_image",
    "bad_dockerfile",
    "cached",
    "cancel_mid_build",
    "cached",
)
EXPECTED = {
    "new_image": "succeeded",
    "cached": "succeeded",
    "missing_file": "failed",
    "bad_dockerfile": "failed",
    "cancel_at_start": "cancelled",
    "cancel_mid_build": "cancelled",
}


@dataclass
class Usage:
    """What the leader holds: open descriptors, and connections to its engine."""

    fds: int
    engine_sockets: int

    def __str__(self) -> str:
        return f"{self.fds} fds, {self.engine_sockets} engine sockets"


def usage(pid: int, engine_socket: Path) -> Usage:
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = set()
    count = 0
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except FileNotFoundError:  # closed meanwhile
            continue
        count += 1
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return Usage(count, len(inodes & _engine_peers(engine_socket)))


def _engine_peers(engine_socket: Path) -> set[int]:
    """The inodes of the client ends of every connection the engine has accepted."""
    out = subprocess.run(["ss", "-x", "-n", "-H"], capture_output=True, text=True, check=True)
    peers = set()
    for line in out.stdout.splitlines():
        fields = line.split()
        # Netid State Recv-Q Send-Q Local Port Peer Port: the engine's end is named by path
        if len(fields) >= 8 and fields[4] == str(engine_socket):
            peers.add(int(fields[7]))
    return peers


class Sampler:
    """Reads the leader's usage every SAMPLE_S seconds while the run goes on; keeps the peak."""

    def __init__(self, pid: int, engine_socket: Path) -> None:
        self._read = lambda: usage(pid, engine_socket)
        self.peak = Usage(0, 0)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Sampler:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            now = await asyncio.to_thread(self._read)
            self.peak = Usage(
                max(self.peak.fds, now.fds), max(self.peak.engine_sockets, now.engine_sockets)
            )
            await asyncio.sleep(SAMPLE_S)


def _context(root: Path, base: str, kind: str) -> bytes:
    """A context of `kind` on the base image. A new image is a step of its own, which
    leaves an image for retention to remove later; a cancelled build sleeps until cut."""
    directory = root / uuid.uuid4().hex
    directory.mkdir()
    steps = {
        "new_image": [f"ENV RUN_ID={directory.name}"],
        "cached": [],
        "missing_file": ["COPY not-in-the-context /x"],
        "bad_dockerfile": ["NOT-AN-INSTRUCTION here"],
        "cancel_at_start": ['RUN ["/bin/busybox", "sleep", "20"]'],
        "cancel_mid_build": ['RUN ["/bin/busybox", "sleep", "20"]'],
    }[kind]
    lines = [f"FROM {base}", *steps]
    (directory / "Dockerfile").write_text("\n".join(lines) + "\n")
    return tar_of(directory)


async def _bases(engine: Dockerd, root: Path, apps: list[str]) -> dict[str, str]:
    """A busybox base image for each app, built side by side (an engine of the test
    session's own: they go with it)."""
    bases = {app: f"{app}-base:{uuid.uuid4().hex[:8]}" for app in apps}
    await _each(
        engine,
        (("build", "-q", "-t", bases[app], str(busybox_context(root / app))) for app in apps),
    )
    return bases


async def _each(engine: Dockerd, commands: Iterable[tuple[str, ...]]) -> None:
    """Run docker commands against `engine` side by side."""
    await asyncio.gather(*(asyncio.to_thread(engine.cli, *command) for command in commands))


async def _follow(api: Api, dep_id: str, cancel_on: Callable[[dict[str, Any]], bool]) -> None:
    """Follow the deployment's events to its end; cancel it at the first that `cancel_on`
    picks (in a task of its own: a cancel answers once the work has stopped)."""
    cancels: list[asyncio.Task[tuple[int, Any]]] = []

    def watch(event: dict[str, Any]) -> None:
        if not cancels and cancel_on(event):
            cancel = api.request("POST", f"/v1/deployments/{dep_id}/cancel")
            cancels.append(asyncio.create_task(cancel))

    await api.events(dep_id, watch)
    for status, doc in await asyncio.gather(*cancels):
        assert status == 200, doc


def _cancel_point(kind: str) -> Callable[[dict[str, Any]], bool]:
    if kind == "cancel_at_start":
        return lambda event: event.get("state") == "building"
    if kind == "cancel_mid_build":  # BuildKit's step of the RUN, once it runs
        return lambda event: (
            event.get("type") == "step"
            and event.get("status") == "running"
            and "RUN" in str(event.get("name"))
        )
    return lambda event: False


async def _lane(api: Api, app: str, base: str, root: Path, kinds: list[str]) -> list[str]:
    """Deploy `app` once per kind, one after another; the final state of each."""
    finals = []
    for kind in kinds:
        status, doc = await api.request(
            "POST",
            "/v1/deployments",
            params={"app": app},
            data=_context(root, base, kind),
            headers={"Content-Type": "application/gzip"},
        )
        assert status == 202, doc
        await _follow(api, doc["id"], _cancel_point(kind))
        status, final = await api.request("GET", f"/v1/deployments/{doc['id']}")
        assert status == 200, final
        assert final["state"] == EXPECTED[kind], (kind, final.get("error"))
        finals.append(final["state"])
    return finals


async def _settled(read: Callable[[], Usage], before: Usage) -> Usage:
    """The usage once back within TOLERANCE of `before`, or as it is after SETTLE_S."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        now = await asyncio.to_thread(read)
        back = abs(now.fds - before.fds) <= TOLERANCE
        if back and abs(now.engine_sockets - before.engine_sockets) <= TOLERANCE:
            return now
        if time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.5)


@pytest.mark.timeout(300)
async def test_descriptors_and_engine_connections_come_back_after_300_deployments(
    leader_process: Callable[..., LeaderProcess], dockerd: Dockerd, tmp_path: Path
) -> None:
    """300 deployments of 10 apps, a mix of succeeded, failed and cancelled, each ends as
    its kind says; the leader's fds and engine sockets come back within 5 of the start."""
    apps = [f"fds{i}" for i in range(LANES)]
    bases = await _bases(dockerd, tmp_path, apps)
    leader = leader_process(leader={"max_parallel_builds": LANES})  # default retention
    leader.start()
    assert leader.proc is not None
    api = leader.api

    def read() -> Usage:
        assert leader.proc is not None
        return usage(leader.proc.pid, dockerd.sock)

    before = read()
    # each lane goes through the kinds in turn, starting at a kind of its own
    lanes = [
        [KINDS[(i + k) % len(KINDS)] for k in range(DEPLOYMENTS // LANES)] for i in range(LANES)
    ]
    started = time.monotonic()
    async with Sampler(leader.proc.pid, dockerd.sock) as sampler:
        finals = await asyncio.gather(
            *(
                _lane(api, app, bases[app], tmp_path, kinds)
                for app, kinds in zip(apps, lanes, strict=True)
            )
        )
    elapsed = time.monotonic() - started
    await api.drop_connections()
    at_end = read()
    after = await _settled(read, before)
    settle_s = time.monotonic() - started - elapsed

    counts = {state: sum(f.count(state) for f in finals) for state in set(EXPECTED.values())}
    print(f"descriptors: {DEPLOYMENTS} deployments in {elapsed:.1f} s: {counts}")
    print(f"descriptors: before {before}; peak {sampler.peak}; at the end {at_end};")
    print(f"descriptors: after {after}, {settle_s:.1f} s after the run")
    assert sum(counts.values()) == DEPLOYMENTS
    assert abs(after.fds - before.fds) <= TOLERANCE, (before, sampler.peak, after)
    assert abs(after.engine_sockets - before.engine_sockets) <= TOLERANCE, (before, after)
