"""What the hub benchmarks share: a leader state dir with enrolled nodes, and fleets of
simulated workers as separate processes.

Nodes enrol once through the leader's real join API (concurrently, with the worker's
own `enrol`); their identities are cached next to the leader's state, so later runs
only connect. No Docker Engine is needed: the hub path never calls it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec

from agent.eventloop import daemon_loop
from agent.leader.links.hub import Hub
from agent.leader.server import tune_collector
from agent.logs import configure
from agent.tls import new_secret
from agent.worker.identity import enrol
from bench.scratch import scratch_dir
from bench.simworkers import FleetSpec, raise_fd_limit
from tests.support.leader import InProcessLeader, leader_config
from tests.support.procs import stop

DEFAULT_STATE = Path(tempfile.gettempdir()) / "deploy-agent-bench"
NO_ENGINE = "unix:///nonexistent/docker.sock"
ENROL_AT_ONCE = 32


class Enrolled(msgspec.Struct):
    ca_pem: str
    nodes: list[tuple[str, str]]  # (node_id, secret), in enrolment order


def raw_config(state: Path, *, tls: bool, **leader: Any) -> dict[str, Any]:
    overrides: dict[str, Any] = {"plain_http": None} if tls else {}
    return leader_config(state / "leader", NO_ENGINE, leader={**overrides, **leader})


def log_to_file(path: Path, level: str = "info") -> None:
    """The leader's log at its usual level, written to a file as a journal would take it."""
    configure(level, "json")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(path.open("a"))


def identities_file(state: Path) -> Path:
    return state / "identities.json"


def load_enrolled(state: Path) -> Enrolled | None:
    path = identities_file(state)
    return msgspec.json.decode(path.read_bytes(), type=Enrolled) if path.exists() else None


async def ensure_enrolled(state: Path, count: int) -> Enrolled:
    """At least `count` enrolled nodes: enrol only those the cache lacks."""
    have = load_enrolled(state)
    if have is not None and len(have.nodes) >= count:
        return have
    leader = await InProcessLeader(raw_config(state, tls=True)).start()
    try:
        token = await leader.api.join_token()
        nodes = list(have.nodes) if have else []
        gate = asyncio.Semaphore(ENROL_AT_ONCE)

        async def one(i: int) -> tuple[str, str]:
            async with gate:
                identity = await enrol(leader.url, token, f"sim-{i:05d}", new_secret())
            return identity.node_id, identity.secret

        nodes += await asyncio.gather(*(one(i) for i in range(len(nodes), count)))
        ca_pem = (state / "leader" / "tls" / "ca.pem").read_text()
    finally:
        await leader.stop()
    enrolled = Enrolled(ca_pem=ca_pem, nodes=nodes)
    identities_file(state).write_bytes(msgspec.json.encode(enrolled))
    return enrolled


class Fleet:
    """Simulated workers spread over `procs` processes."""

    def __init__(self, work: Path, url: str, enrolled: Enrolled, count: int, procs: int) -> None:
        self.work = work
        self.url = url
        self.enrolled = enrolled
        self.count = count
        self.procs = max(1, min(procs, count))
        self._children: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        *,
        tls: bool,
        stuck: int = 0,
        stuck_for: float = 0.0,
        cycles: int = 0,
        deflate: bool = False,
    ) -> Fleet:
        nodes = self.enrolled.nodes[: self.count]
        for p in range(self.procs):
            spec = FleetSpec(
                url=self.url,
                identities=nodes[p :: self.procs],
                ca_pem=self.enrolled.ca_pem if tls else None,
                stuck=stuck if p == 0 else 0,
                stuck_for=stuck_for,
                cycles=cycles,
                deflate=deflate,
            )
            path = self.work / f"fleet-{p}.json"
            path.write_bytes(msgspec.json.encode(spec))
            with (self.work / f"fleet-{p}.log").open("ab") as log:
                self._children.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "bench.simworkers", str(path)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
                    )
                )
        return self

    def cpu_seconds(self) -> float:
        """User and system CPU the simulated workers have used so far."""
        return sum(process_cpu_seconds(child.pid) for child in self._children)

    def stuck_node(self) -> str:
        return self.enrolled.nodes[0][0]

    def running(self) -> bool:
        return all(child.poll() is None for child in self._children)

    def wait(self, timeout: float) -> None:
        for child in self._children:
            child.wait(timeout)

    def stop(self) -> None:
        for child in self._children:
            stop(child, 20)
        self._children.clear()


def process_cpu_seconds(pid: int) -> float:
    """A running process's user and system CPU time, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_for(check: Any, within: float, what: str, every: float = 0.1) -> None:
    """Poll `check()` (a plain callable) until true; fail naming `what` after `within` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise TimeoutError(f"{what} not reached within {within} s")
        await asyncio.sleep(every)


@contextlib.asynccontextmanager
async def connected_fleet(
    args: argparse.Namespace, total: int, *, gc_young: int, stuck: int = 0, stuck_for: float = 0.0
) -> AsyncIterator[tuple[Hub, Fleet, list[str]]]:
    """A leader in this process (its log in a temporary dir) with `total` simulated
    workers connected and synced: its hub, the fleet and the node ids, in fleet order."""
    raise_fd_limit()
    with scratch_dir("bench-hub-") as work:
        log_to_file(work / "leader.log")
        enrolled = await ensure_enrolled(args.state, total)
        leader = await InProcessLeader(raw_config(args.state, tls=args.tls)).start()
        if gc_young:
            tune_collector(gc_young)  # as `deploy-agent run` does once the leader is up
        fleet = Fleet(work, leader.url, enrolled, total, args.procs)
        try:
            assert leader.leader.ctx is not None
            hub = leader.leader.ctx.hub
            fleet.start(tls=args.tls, stuck=stuck, stuck_for=stuck_for)
            await wait_for(lambda: hub.connected_count >= total, 300, f"{total} workers connected")
            await asyncio.sleep(1.0)  # let every Sync be answered
            yield hub, fleet, [node_id for node_id, _ in enrolled.nodes[:total]]
        finally:
            fleet.stop()
            await leader.stop()


def bench_parser(doc: str | None, workers: int) -> argparse.ArgumentParser:
    """The options every hub benchmark takes."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--workers", type=int, default=workers)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--procs", type=int, default=2, help="simulated worker processes")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="enrolment cache")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser


Result = dict[str, Any]


def bench_main(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, Result]],
    render: Callable[[Result], str],
) -> Result:
    # The leader here runs on the loop it runs on as deployed (DEPLOY_AGENT_EVENT_LOOP too).
    with asyncio.Runner(loop_factory=daemon_loop()) as runner:
        result = runner.run(run(args))
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result
