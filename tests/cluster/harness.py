"""A cluster of simulated hosts for fault tests, each a network namespace on one bridge.

The leader host runs a Docker Engine, the registry (TLS from the test's own CA, with a
login) and `deploy-agent run` as leader; each worker host runs an engine and
`deploy-agent run` as worker. Any process can be killed, paused or restarted and any
host's link cut or slowed; `heal` undoes every fault and `close` removes everything the
cluster made, also after a failed test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.tls import ensure_leader_tls
from tests.support.api import Api
from tests.support.dockerd import Dockerd
from tests.support.leader import LeaderProcess, leader_config
from tests.support.netns import Hosts
from tests.support.registry import Registry
from tests.support.worker import WorkerProcess

LEADER = "leader"
LEADER_PORT = 7443
WORKERS = ("w1", "w2")
# The rest of the suite uses 10.213.77.0/24; this range keeps clusters of concurrent runs
# apart (the bridge has an address here, so two equal subnets would clash).
NETS = range(100, 250)
# Long enough for a 60 s registry outage, as the default of 5 minutes is.
PUSH_RETRY_BUDGET = 90
T = TypeVar("T")


class Service(Protocol):
    """A process the cluster runs: engines, the registry and the agents all fit."""

    proc: subprocess.Popen[bytes] | None

    def start(self) -> Any: ...


def _free_net() -> int:
    used = subprocess.run(
        ["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    free = [net for net in NETS if f"10.213.{net}." not in used]
    return random.choice(free)


class Cluster:
    def __init__(self, root: Path, workers: Sequence[str]) -> None:
        self.root = root
        self.hosts = Hosts([LEADER, *workers], net=_free_net(), gateway=True)
        self.engines = {name: Dockerd(prefix=self.hosts.nsenter(name)) for name in self.hosts.names}
        self.address = self.hosts.address(LEADER)
        self.leader_url = f"https://{self.address}:{LEADER_PORT}"
        self.tls = ensure_leader_tls(root / "registry-ca", [self.address])
        self.registry = Registry(
            address=self.address,
            tls=(self.tls.cert_file, self.tls.key_file),
            prefix=self.hosts.nsenter(LEADER),
        )
        self.certs_dir = Path("/etc/docker/certs.d") / self.registry.host
        self.leader = self._leader_process()
        self.workers: dict[str, WorkerProcess] = {}
        self._paused: dict[int, subprocess.Popen[bytes]] = {}
        self._leader_changed = False

    # --- start and stop -------------------------------------------------------------

    def start(self) -> None:
        """Bring every host up; engines start side by side."""
        self.hosts.open()
        self.certs_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.tls.ca_file, self.certs_dir / "ca.crt")
        with ThreadPoolExecutor(len(self.engines)) as pool:
            list(pool.map(Dockerd.start, self.engines.values()))
        self.registry.start()
        self.leader.start()
        token = self._with_api(self._configure_leader)
        for name in self.hosts.names[1:]:
            self.workers[name] = self._worker_process(name, token)
            self.workers[name].start()
        self._with_api(lambda api: api.wait_nodes(**dict.fromkeys(self.workers, True)))

    async def _configure_leader(self, api: Api) -> str:
        reg = self.registry
        status, doc = await api.put_registry(reg.host, reg.username, reg.password)
        assert status == 200, doc
        return await api.join_token()

    def close(self) -> None:
        """Remove everything; each step runs even when an earlier one failed."""
        for proc in list(self._paused.values()):
            _signal(proc, signal.SIGCONT)
        self._paused.clear()
        steps: list[Callable[[], object]] = [
            *(worker.terminate for worker in self.workers.values()),
            self._stop_leader,
            self.registry.cleanup,
            self._stop_engines,
            lambda: shutil.rmtree(self.certs_dir, ignore_errors=True),
            self.hosts.close,
        ]
        for step in steps:
            with contextlib.suppress(Exception):
                step()

    def _stop_leader(self) -> None:
        if self.leader.proc is not None:
            self.leader.terminate()

    def _stop_engines(self) -> None:
        with ThreadPoolExecutor(len(self.engines)) as pool:
            list(pool.map(Dockerd.stop, self.engines.values()))

    # --- the agents' processes ----------------------------------------------------------

    def _leader_process(self, **leader: Any) -> LeaderProcess:
        raw = leader_config(
            self.root / "leader" / "state",
            self.engines[LEADER].url,
            log={"level": "info", "format": "json"},
            leader={
                "listen": f"{self.address}:{LEADER_PORT}",
                "plain_http": None,
                "tls_names": [self.address],
                "push_retry_budget": PUSH_RETRY_BUDGET,
                "stage_timeouts": {"building": 120, "pushing": PUSH_RETRY_BUDGET + 60},
                **leader,
            },
        )
        workdir = self.root / "leader"
        workdir.mkdir(parents=True, exist_ok=True)
        return LeaderProcess(raw, workdir, prefix=self.hosts.nsenter(LEADER))

    def _worker_process(self, name: str, token: str) -> WorkerProcess:
        workdir = self.root / name
        workdir.mkdir(parents=True, exist_ok=True)
        return WorkerProcess(
            workdir,
            name=name,
            engine_url=self.engines[name].url,
            leader_url=self.leader_url,
            token=token,
            prefix=self.hosts.nsenter(name),
        )

    def reconfigure_leader(self, **leader: Any) -> None:
        """Restart the leader (same state) with `leader` keys changed; `heal` restores them."""
        self._stop_leader()
        self.leader = self._leader_process(**leader)
        self.leader.start()
        self._leader_changed = bool(leader)

    def _with_api(self, use: Callable[[Api], Awaitable[T]]) -> T:
        """Run one API exchange from synchronous set-up code, with a client of its own."""

        async def run() -> T:
            api = self.new_api()
            try:
                return await use(api)
            finally:
                await api.close()

        return asyncio.run(run())

    def new_api(self) -> Api:
        """A client of the leader's API for the running event loop; the caller closes it."""
        api = Api(self.leader_url, self.leader.token)
        api.trust(self.root / "leader" / "state" / "tls" / "ca.pem")
        return api

    # --- faults ---------------------------------------------------------------------------

    def kill(self, service: Service) -> None:
        """SIGKILL, as a crash or the OOM killer would (a paused process is woken first)."""
        proc = service.proc
        if proc is None or proc.poll() is not None:
            return
        self._resume_proc(proc)
        proc.kill()
        proc.wait()

    def pause(self, service: Service) -> None:
        """SIGSTOP: the process holds its sockets but answers nothing."""
        assert service.proc is not None
        _signal(service.proc, signal.SIGSTOP)
        self._paused[service.proc.pid] = service.proc

    def resume(self, service: Service) -> None:
        if service.proc is not None:
            self._resume_proc(service.proc)

    def _resume_proc(self, proc: subprocess.Popen[bytes]) -> None:
        if self._paused.pop(proc.pid, None) is not None:
            _signal(proc, signal.SIGCONT)

    def revive(self, service: Service) -> None:
        """Start a service again if it is not running."""
        if service.proc is None or service.proc.poll() is not None:
            service.start()

    def cut(self, host: str) -> None:
        self.hosts.cut(host)

    def heal(self) -> None:
        """Undo every fault: wake, reconnect, unthrottle, start what is down, and put the
        leader's configuration back."""
        for proc in list(self._paused.values()):
            self._resume_proc(proc)
        for host in self.hosts.names:
            self.hosts.heal(host)
            self.hosts.unthrottle(host)
        for engine in self.engines.values():
            self.revive(engine)
        if self.registry.proc is None or self.registry.proc.poll() is not None:
            self.registry.start()
        if self._leader_changed:
            self.reconfigure_leader()
        self.revive(self.leader)
        for worker in self.workers.values():
            self.revive(worker)

    # --- what the tests read ------------------------------------------------------------

    def holds(self, host: str, image: str) -> bool:
        return self.engines[host].cli("image", "inspect", image, check=False).returncode == 0

    def worker_events(self, host: str, event: str, since: int = 0) -> list[dict[str, Any]]:
        """The worker's structured log events named `event`, from byte offset `since`."""
        return _log_events(self.workers[host].log_path, event, since)

    def log_size(self, host: str) -> int:
        path = self.workers[host].log_path
        return path.stat().st_size if path.exists() else 0


def _log_events(path: Path, event: str, since: int) -> list[dict[str, Any]]:
    with path.open("rb") as log:
        log.seek(since)
        lines = log.read().decode(errors="replace").splitlines()
    found = []
    for line in lines:
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and doc.get("event") == event:
                found.append(doc)
    return found


def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


def measured(figures: dict[str, Any]) -> None:
    """Print a scenario's figures as one JSON line, so the log records what was measured."""
    print("cluster.figures " + json.dumps(figures, sort_keys=True))


def since(started: float) -> float:
    return round(time.monotonic() - started, 2)


async def sleep_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll `check` every 0.1 s until true; return the seconds it took."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {timeout} s") from None
    return since(started)


async def first_event(
    api: Api, dep_id: str, match: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    """Follow the deployment's events until one matches; fail if it ends first."""
    return await api.first_event(dep_id, match, timeout)


async def metric(api: Api, name: str) -> float:
    """One unlabelled sample from the leader's /metrics."""
    async with api.session.get(
        f"{api.base_url}/metrics", headers={"Authorization": f"Bearer {api.token}"}, ssl=api.ssl
    ) as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")
