"""The bootstrap's steps, in order: each does one thing on the host or asks the leader
and says in one line what it found. A failure raises `BootstrapError` naming the step;
no step puts a secret in a command (the join token goes as a file over SFTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tomllib
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from agent import __version__
from agent.bootstrap import render
from agent.bootstrap.plan import DEFAULT_STATE_DIR, NODE_NAME, UNIT_NAME, Plan
from agent.errors import BootstrapError, SshError
from agent.procs import communicate_within
from agent.ssh import Completed, SshHost

BUILD_TIMEOUT = 300.0
POLL_SECONDS = 0.5
MIN_PYTHON = (3, 11)
LOCK_IN_WHEEL = "agent/requirements.txt"


class LeaderApi(Protocol):
    async def call(self, method: str, path: str) -> Any: ...


@dataclass(frozen=True)
class Outcome:
    status: Literal["ok", "skipped"]
    detail: str


def ok(detail: str) -> Outcome:
    return Outcome("ok", detail)


def skipped(detail: str) -> Outcome:
    return Outcome("skipped", detail)


@dataclass
class Session:
    """What the steps share: the plan, the leader, the connection and what was found."""

    plan: Plan
    leader: LeaderApi
    workdir: Path  # local scratch space, removed after the run
    host: SshHost | None = None
    wheel: Path | None = None
    requirements: Path | None = None
    name: str = ""
    enrolled_as: str | None = None
    systemd: bool = False
    seen_before: float | None = None

    @property
    def remote(self) -> SshHost:
        assert self.host is not None, "the connect step comes first"
        return self.host

    async def must_run(self, step: str, command: str, *, deadline: float, why: str) -> Completed:
        done = await self.remote.run(command, deadline=deadline, label=f"the {step} command")
        if not done.ok:
            raise BootstrapError(step, f"{why}: {done.reason()}")
        return done

    async def node(self) -> dict[str, Any] | None:
        """The leader's record of this node, found by name, or None."""
        doc = await self.leader.call("GET", "/v1/nodes")
        found: list[dict[str, Any]] = [n for n in doc["nodes"] if n["name"] == self.name]
        return found[0] if found else None


StepFn = Callable[[Session], Awaitable[Outcome]]


@dataclass(frozen=True)
class Step:
    name: str
    deadline: float
    run: StepFn


async def find_wheel(s: Session) -> Outcome:
    given = s.plan.wheel
    if given is not None:
        if not given.is_file() or not given.name.startswith("deploy_agent-"):
            raise BootstrapError("wheel", f"{given} is not a deploy-agent wheel")
        s.wheel = given
        detail = f"{given.name} (given)"
    else:
        source = source_tree()
        if source is None:
            raise BootstrapError(
                "wheel",
                "no checkout to build the wheel from (neither this agent's nor the current "
                "directory's): run it in a checkout, or pass --wheel PATH (built in a "
                "checkout with `uv build --wheel`)",
            )
        s.wheel = await build_wheel(source, s.workdir)
        detail = f"{s.wheel.name} built from {source}"
    s.requirements = locked_requirements(s.wheel, s.workdir)
    return ok(f"{detail}, with its locked dependencies")


def source_tree() -> Path | None:
    """The checkout to build the wheel from: the one this agent runs from, else (an
    agent installed from a wheel) the one the command runs in, if it holds this
    version. A checkout of another version would install a worker of that version."""
    for root in (Path(__file__).resolve().parents[2], *_here_and_up()):
        version = _checkout_version(root)
        if version is None:
            continue
        if version != __version__:
            raise BootstrapError(
                "wheel",
                f"the checkout in {root} is deploy-agent {version}, this one is "
                f"{__version__}: pass --wheel PATH, or run the checkout's own deploy-agent",
            )
        return root
    return None


def _here_and_up() -> list[Path]:
    here = Path.cwd().resolve()
    return [here, *here.parents]


def _checkout_version(root: Path) -> str | None:
    """The version a deploy-agent checkout at `root` declares, or None for no checkout."""
    try:
        project = tomllib.loads((root / "pyproject.toml").read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return str(project.get("version")) if project.get("name") == "deploy-agent" else None


def uv_command(source: Path) -> str | None:
    """uv, which builds the wheel with the backend it carries: the checkout's own (what
    its set-up scripts installed), else the one beside this interpreter (installed into
    the same virtualenv), else one on PATH."""
    for own in (source / ".tools" / "bin" / "uv", Path(sys.executable).parent / "uv"):
        if own.is_file():
            return str(own)
    return shutil.which("uv")


async def build_wheel(source: Path, out: Path) -> Path:
    uv = uv_command(source)
    if uv is None:
        raise BootstrapError(
            "wheel",
            f"uv is needed to build the wheel: run {source}/scripts/lock once, or "
            "pass --wheel PATH",
        )
    proc = await asyncio.create_subprocess_exec(
        *(uv, "build", "-q", "--wheel", "--out-dir", str(out), str(source)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # killed as a group on its deadline
    )
    try:
        output, _ = await communicate_within(proc, BUILD_TIMEOUT)
    except TimeoutError:
        raise BootstrapError(
            "wheel", f"uv build did not finish within {BUILD_TIMEOUT:.0f} s"
        ) from None
    built = _wheels_in(out)
    if proc.returncode != 0 or not built:
        tail = " | ".join(output.decode(errors="replace").strip().splitlines()[-5:])
        raise BootstrapError("wheel", f"uv could not build the wheel: {tail}")
    return built[-1]


def _wheels_in(directory: Path) -> list[Path]:
    return sorted(directory.glob("deploy_agent-*.whl"))


def locked_requirements(wheel: Path, out: Path) -> Path:
    """The hashed requirements the wheel carries (its lock's export), written to `out`:
    the host installs exactly the dependencies that version was tested with."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            text = archive.read(LOCK_IN_WHEEL)
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise BootstrapError(
            "wheel",
            f"{wheel.name} carries no {LOCK_IN_WHEEL} ({exc}): is it a deploy-agent "
            "wheel of this release or newer?",
        ) from None
    target = out / "requirements.txt"
    target.write_bytes(text)
    return target


async def connect(s: Session) -> Outcome:
    plan = s.plan
    s.host = await SshHost.connect(
        plan.target, known_hosts=plan.known_hosts, identity=plan.identity
    )
    hostname = (await s.must_run("connect", "hostname", deadline=15, why="hostname")).stdout.strip()
    s.name = plan.name or hostname
    if not NODE_NAME.match(s.name):
        raise BootstrapError("connect", f"the hostname {hostname!r} is no node name: pass --name")
    return ok(f"{plan.target} (host key known), node name {s.name}")


async def check_leader(s: Session) -> Outcome:
    cluster = await s.leader.call("GET", "/v1/cluster")
    node = await s.node()
    s.enrolled_as = node["id"] if node else None
    where = f"enrolled as {node['id']}" if node else "not enrolled yet"
    version = cluster["leader"]["version"]
    return ok(f"leader {version} answers ({cluster['mode']} mode); node {s.name} {where}")


async def check_engine(s: Session) -> Outcome:
    url = s.plan.engine_url
    why = f"the Docker Engine at {url} does not answer"
    found = (await s.must_run("engine", render.engine_check(s.plan), deadline=30, why=why)).stdout
    if found.strip() == "socket":
        return ok(f"{url}: the socket is there (no docker CLI on the host to ask the engine)")
    return ok(f"Docker Engine {found.strip()} at {url}")


async def check_python(s: Session) -> Outcome:
    why = "python3 with venv and ensurepip is needed (Debian: apt-get install python3-venv)"
    found = (await s.must_run("python", render.PYTHON_CHECK, deadline=30, why=why)).stdout.strip()
    version = tuple(int(part) for part in found.split(".")[:2])
    if version < MIN_PYTHON:
        raise BootstrapError("python", f"python3 is {found}; deploy-agent needs 3.11 or newer")
    return ok(f"python3 {found}")


async def upload(s: Session) -> Outcome:
    assert s.wheel is not None and s.requirements is not None
    files = [s.wheel, s.requirements, *dependency_wheels(s.plan.wheelhouse)]
    await s.remote.upload(files, s.plan.wheels_dir, deadline=240)
    size = sum(path.stat().st_size for path in files) / 1e6
    extra = f" and {len(files) - 2} dependency wheels" if len(files) > 2 else ""
    return ok(f"{s.wheel.name}{extra} to {s.plan.wheels_dir} ({size:.1f} MB)")


def dependency_wheels(wheelhouse: Path | None) -> list[Path]:
    if wheelhouse is None:
        return []
    found = sorted(p for p in wheelhouse.glob("*.whl") if not p.name.startswith("deploy_agent-"))
    if not found:
        raise BootstrapError("upload", f"--wheelhouse {wheelhouse} holds no wheels")
    return found


def _version(s: Session) -> str:
    assert s.wheel is not None
    return s.wheel.name.split("-")[1]


async def make_virtualenv(s: Session) -> Outcome:
    venv = s.plan.venv(_version(s))
    why = f"cannot make a virtualenv in {venv}"
    script = render.virtualenv(s.plan, _version(s))
    done = await s.must_run("virtualenv", script, deadline=110, why=why)
    return ok(f"{done.stdout.strip()} {venv}")


async def install(s: Session) -> Outcome:
    assert s.wheel is not None
    version = _version(s)
    await s.remote.write_file(s.plan.guard_path, render.guard(), mode=0o755, deadline=30)
    offline = s.plan.wheelhouse is not None
    script = render.install(s.plan, version, s.wheel.name, offline=offline)
    why = "pip could not install deploy-agent"
    done = await s.must_run("install", script, deadline=590, why=why)
    reported = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    wanted = f"deploy-agent {version}"
    if reported != wanted:
        raise BootstrapError("install", f"{s.plan.agent_bin} says {reported!r}, not {wanted!r}")
    return ok(f"{wanted} in {s.plan.venv(version)}, current; guard {s.plan.guard_path}")


async def write_config(s: Session) -> Outcome:
    """Check what can still refuse this run first, then put the files in place: an agent
    already running on the host must find readable, valid files at its next restart even
    when a later step fails."""
    plan = s.plan
    await _check_service_manager(s)
    token = (plan.join_token.strip() + "\n").encode()
    await s.remote.write_file(plan.token_path, token, mode=0o600, deadline=30)
    staged = plan.config_path + ".new"
    config = render.worker_config(plan, s.name).encode()
    await s.remote.write_file(staged, config, mode=0o640, deadline=30)
    why = f"the agent refuses the new {plan.config_path} (the old one stays)"
    await s.must_run("config", render.check_config(plan, staged), deadline=30, why=why)
    why = f"cannot put {plan.config_path} in place"
    await s.must_run("config", render.put_config_in_place(plan, staged), deadline=30, why=why)
    kept = (await s.remote.run(render.has_identity(plan), deadline=15)).stdout.strip() == "kept"
    unknown = kept and not await _identity_known(s)
    if unknown:
        why = "cannot set aside the identity the leader does not know"
        await s.must_run("config", render.set_identity_aside(plan), deadline=15, why=why)
        kept = False
    if not kept and s.enrolled_as is not None:
        raise BootstrapError(
            "config",
            f"the leader already has a node named {s.name} ({s.enrolled_as}) and this host has "
            f"no identity in {plan.state_dir}: revoke that node (deploy-agent nodes revoke "
            f"{s.enrolled_as}) or pass another --name",
        )
    identity = "identity kept" if kept else "it enrols with the join token"
    if unknown:
        identity = f"its identity is not enrolled here (revoked?), set aside: {identity}"
    return ok(f"{plan.config_path}, {plan.token_path} (0600); {identity}")


async def _identity_known(s: Session) -> bool:
    """Is the node the host's identity names enrolled with this leader? Not when it was
    revoked, or enrolled with another leader: the agent would be refused for good."""
    node_id = (await s.remote.run(render.identity_node_id(s.plan), deadline=15)).stdout.strip()
    doc = await s.leader.call("GET", "/v1/nodes")
    return any(node["id"] == node_id for node in doc["nodes"])


async def _check_service_manager(s: Session) -> None:
    found = await s.remote.run(render.SYSTEMD_CHECK, deadline=15)
    s.systemd = found.stdout.strip() == "systemd"
    if s.systemd and s.plan.state_dir != DEFAULT_STATE_DIR:
        raise BootstrapError(
            "config", f"the unit keeps its state in {DEFAULT_STATE_DIR}: drop --state-dir"
        )


async def install_service(s: Session) -> Outcome:
    plan = s.plan
    if not s.systemd:
        return skipped("no systemd on this host")
    await s.remote.write_file(
        plan.unit_path, render.unit_file(plan).encode(), mode=0o644, deadline=30
    )
    s.seen_before = await last_seen(s)
    why = f"systemd could not start {UNIT_NAME}"
    await s.must_run("service", render.systemd_install(plan), deadline=170, why=why)
    return ok(f"{plan.unit_path} written, enabled and (re)started")


async def start_agent(s: Session) -> Outcome:
    if s.systemd:
        return skipped("systemd runs the agent")
    s.seen_before = await last_seen(s)
    why = "could not start the agent"
    done = await s.must_run("start", render.nohup_start(s.plan), deadline=50, why=why)
    pid = done.stdout.strip().splitlines()[-1]
    return ok(f"started without systemd (nohup): pid {pid}, log {s.plan.log_path}")


async def last_seen(s: Session) -> float | None:
    node = await s.node()
    return float(node["last_seen"]) if node and node.get("last_seen") else None


async def wait_connected(s: Session) -> Outcome:
    deadline = asyncio.timeout(s.plan.wait_seconds)
    try:
        async with deadline:
            node = await _poll_connected(s)
    except TimeoutError:
        if not deadline.expired():
            raise
        raise BootstrapError(
            "connected",
            f"node {s.name} did not connect within {s.plan.wait_seconds:.0f} s; "
            f"the agent's log ends: {await _log_tail(s)}",
        ) from None
    # Enrolled: the node has its own secret now. The join token would let anyone on this
    # host enrol more nodes until it is rotated, and the agent no longer needs it.
    forgotten = await _forget_join_token(s)
    token = "join token removed from the host" if forgotten else "join token left in place"
    return ok(
        f"node {s.name} ({node['id']}) connected: agent {node['agent_version']}, "
        f"engine {node['engine_version']} {node['arch']}; {token}"
    )


async def _forget_join_token(s: Session) -> bool:
    """The token file goes, and the config no longer names it."""
    staged = s.plan.config_path + ".new"
    config = render.worker_config(s.plan, s.name, join_token=False).encode()
    await s.remote.write_file(staged, config, mode=0o640, deadline=30)
    return (await s.remote.run(render.forget_join_token(s.plan, staged), deadline=30)).ok


async def _poll_connected(s: Session) -> dict[str, Any]:
    while True:
        node = await s.node()
        if node and node["connected"] and (node.get("last_seen") or 0) > (s.seen_before or 0):
            return node
        await asyncio.sleep(POLL_SECONDS)


async def _log_tail(s: Session) -> str:
    with contextlib.suppress(SshError):
        done = await s.remote.run(render.log_tail(s.plan, s.systemd), deadline=15)
        return " | ".join(done.stdout.strip().splitlines()[-5:]) or "(empty)"
    return "(could not be read)"


def steps(plan: Plan) -> list[Step]:
    return [
        Step("wheel", BUILD_TIMEOUT + 10, find_wheel),
        Step("connect", 40, connect),
        Step("leader", 30, check_leader),
        Step("engine", 40, check_engine),
        Step("python", 40, check_python),
        Step("upload", 250, upload),
        Step("virtualenv", 120, make_virtualenv),
        Step("install", 600, install),
        Step("config", 120, write_config),
        Step("service", 240, install_service),
        Step("start", 60, start_agent),
        Step("connected", plan.wait_seconds + 30, wait_connected),
    ]
