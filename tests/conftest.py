"""Fixtures: a real Docker Engine for the session, real registries and leaders per test."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agent import logs
from tests.support.canary import CANARY, MARKER_ENV
from tests.support.dockerd import Dockerd
from tests.support.leader import InProcessLeader, LeaderProcess, leader_config
from tests.support.registry import Registry
from tests.support.releases import PREVIOUS, PREVIOUS_SHA256, Installed, install_release
from tests.support.sshd import Sshd
from tests.support.wheels import Wheelhouse
from tests.support.worker import WorkerProcess

# Tests run in parallel processes (pytest-xdist, --dist loadgroup). Tests that share a
# resource run in one process: a loopback Swarm owns the host's docker_gwbridge (one per
# machine: tests/support/dockerd.py), and the wheelhouse and the simulated cluster are
# built once for their tests. xdist joins the names of all of a test's groups into one,
# so a test of the Swarm is put in the Swarm's group alone, whatever its module asks for.
SWARM = ("swarm_engine", "swarm")
SHARED_RESOURCES = {"wheelhouse": "wheel", "cluster": "cluster"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    groups = {item: _group(item) for item in items}
    for item in items:
        for node in item.listchain():
            node.own_markers[:] = [m for m in node.own_markers if m.name != "xdist_group"]
    for item, group in groups.items():
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


def _group(item: pytest.Item) -> str | None:
    fixtures = getattr(item, "fixturenames", ())
    if SWARM[0] in fixtures:
        return SWARM[1]
    names = {str(mark.args[0]) for mark in item.iter_markers("xdist_group")}
    names |= {group for fixture, group in SHARED_RESOURCES.items() if fixture in fixtures}
    return "_".join(sorted(names)) or None


def pytest_collection_finish(session: pytest.Session) -> None:
    """In an xdist worker: fail at once, rather than by the Swarm lock's timeout, when
    xdist did not take the groups (it marks a grouped test's id with `@group`)."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    for item in session.items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
            raise pytest.UsageError(
                f"pytest-xdist ignored the test groups ({item.nodeid} has none): "
                "this pytest and pytest-xdist do not work together"
            )


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    logs.configure("info", "json")


@pytest.fixture(scope="session", autouse=True)
def _canary_watch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Sample every process's argv each second while the tests run, for the final scan."""
    CANARY_ROOTS.append(tmp_path_factory.getbasetemp())
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            CANARY.sample_argv()

    sampler = threading.Thread(target=sample, name="canary-argv", daemon=True)
    sampler.start()
    yield
    done.set()
    sampler.join(15)


CANARY_ROOTS: list[Path] = []
CANARY_FINDINGS: list[dict[str, Any]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Captured output (in-process leaders log there) is gone after the test: keep it.
    The teardown report carries every section of the test."""
    if report.when != "teardown":
        return
    for name, text in report.sections:
        CANARY.keep(f"{report.nodeid} {name}", text)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault(MARKER_ENV, CANARY.marker)  # one canary for every test process


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """A parallel test process ended: collect what its scan found."""
    CANARY_FINDINGS.append(node.workeroutput.get("canary", {"hits": [], "searched": 0}))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """No canary secret anywhere outside the credential stores, or the run fails."""
    findings = {"hits": CANARY.scan(CANARY_ROOTS), "searched": CANARY.searched}
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a parallel test process: the main one reports
        workeroutput["canary"] = findings
        return
    CANARY_FINDINGS.append(findings)
    hits = [hit for found in CANARY_FINDINGS for hit in found["hits"]]
    searched = sum(found["searched"] for found in CANARY_FINDINGS)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"canary scan: {searched} places searched, {len(hits)} hits", *hits]
    if reporter is not None:
        reporter.write_line("\n".join(lines), red=bool(hits))
    if hits:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def dockerd() -> Iterator[Dockerd]:
    engine = Dockerd()
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def worker_engines() -> Iterator[list[Dockerd]]:
    """Two more engines, one per simulated worker node, started side by side."""
    engines = [Dockerd(), Dockerd()]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(Dockerd.start, engines))
    yield engines
    for engine in engines:
        engine.stop()


@pytest.fixture(scope="session")
def swarm_engine() -> Iterator[Dockerd]:
    """An engine that is a single-node Swarm manager, advertising on loopback."""
    engine = Dockerd()
    engine.start()
    engine.init_swarm()
    yield engine
    engine.leave_swarm()
    engine.stop()


@pytest.fixture
def worker_process(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def make(
        name: str, engine: Dockerd | str, leader_url: str, token: str, **worker: Any
    ) -> WorkerProcess:
        """A worker on `engine`: a test's engine, or the URL of one (behind a proxy)."""
        workdir = tmp_path / f"worker-{name}-{len(started)}"
        workdir.mkdir()
        url = engine if isinstance(engine, str) else engine.url
        proc = WorkerProcess(
            workdir, name=name, engine_url=url, leader_url=leader_url, token=token, **worker
        )
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.terminate()


@pytest.fixture
def registry() -> Iterator[Registry]:
    reg = Registry()
    reg.start()
    yield reg
    reg.cleanup()


@pytest.fixture
async def leader_factory(dockerd: Dockerd, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[InProcessLeader] = []

    async def make(**overrides: Any) -> InProcessLeader:
        state = overrides.pop("state_dir", None) or tmp_path / f"state{len(started)}"
        leader = InProcessLeader(leader_config(Path(state), dockerd.url, **overrides))
        started.append(leader)
        return await leader.start()

    yield make
    for leader in reversed(started):
        await leader.stop()


@pytest.fixture
async def leader(leader_factory: Callable[..., Any]) -> InProcessLeader:
    result: InProcessLeader = await leader_factory()
    return result


@pytest.fixture
async def leader_process(
    dockerd: Dockerd, tmp_path: Path
) -> AsyncIterator[Callable[..., LeaderProcess]]:
    started: list[LeaderProcess] = []

    def make(python: str = sys.executable, **overrides: Any) -> LeaderProcess:
        """A leader process; `python` of another virtualenv runs an earlier release."""
        workdir = tmp_path / f"proc{len(started)}"
        workdir.mkdir()
        raw = leader_config(workdir / "state", dockerd.url, **overrides)
        proc = LeaderProcess(raw, workdir, python=python)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        if proc.proc is not None:
            proc.terminate()
        await proc.api.close()


@pytest.fixture
def sshd() -> Iterator[Sshd]:
    server = Sshd().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def previous_release() -> Iterator[Installed]:
    """The previous release (protocol 1), installed in a virtualenv of its own."""
    installed = install_release(PREVIOUS, PREVIOUS_SHA256)
    yield installed
    installed.cleanup()


@pytest.fixture(scope="session")
def wheelhouse() -> Iterator[Wheelhouse]:
    """deploy-agent's wheel and its dependencies' wheels, built once for the session."""
    house = Wheelhouse.build()
    yield house
    house.cleanup()
