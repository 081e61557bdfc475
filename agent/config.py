"""Configuration: one TOML file loaded once into frozen, typed values.

Every error names the key it is about. Secrets may be given inline, or as `KEY_file`
(a path) or `KEY_env` (an environment variable name); exactly one of the three.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from agent.errors import ConfigError
from agent.ssh_target import SshTarget

Seconds = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class _Value(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every config table: immutable, and an unknown key is an error."""


class LogConfig(_Value, frozen=True, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class EngineConfig(_Value, frozen=True, forbid_unknown_fields=True, kw_only=True):
    url: str = "unix:///var/run/docker.sock"
    timeout: Seconds = 30.0


class TLSConfig(_Value, frozen=True, forbid_unknown_fields=True, kw_only=True):
    cert_file: str
    key_file: str
    ca_file: str  # the CA that issued cert_file: join tokens pin it


class StageTimeouts(_Value, frozen=True, forbid_unknown_fields=True, kw_only=True):
    building: Seconds = 1800.0
    pushing: Seconds = 900.0
    distributing: Seconds = 600.0
    releasing: Seconds = 900.0

    def for_stage(self, stage: str) -> float:
        value: float = getattr(self, stage)
        return value


class WebhookConfig(_Value, frozen=True, forbid_unknown_fields=True, kw_only=True):
    url: Annotated[str, msgspec.Meta(pattern=r"^https?://")]
    secret: Annotated[str, msgspec.Meta(min_length=16)]


class BuildServerConfig(_Value, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A separate host whose Docker Engine builds and pushes, reached over SSH."""

    ssh: Annotated[str, msgspec.Meta(pattern=r"^ssh://[^@/]+@[^/]+$")]
    known_hosts: str
    identity_file: str | None = None
    docker_socket: str = "/var/run/docker.sock"

    def __post_init__(self) -> None:
        SshTarget.parse(self.ssh)  # a port out of range, say: at start, not at the first build

    def check_files(self) -> None:
        """The files it names are there: checked by the leader at start and by
        check-config, not by every reader of the config (the command line needs none)."""
        for key in ("known_hosts", "identity_file"):
            path = getattr(self, key)
            try:
                found = path is None or Path(path).is_file()
            except OSError as exc:  # a directory this user may not search
                raise ConfigError(f"leader.build_server.{key}: {path}: {exc.strerror}") from None
            if not found:
                raise ConfigError(f"leader.build_server.{key}: {path} is not a file")


class LeaderConfig(_Value, frozen=True, forbid_unknown_fields=True, kw_only=True):
    listen: str = "0.0.0.0:7443"
    plain_http: bool = False
    tls: TLSConfig | None = None
    tls_names: tuple[str, ...] = ()
    api_token: str
    max_parallel_builds: PositiveInt = 2
    push_retry_budget: Seconds = 300.0
    max_context_bytes: PositiveInt = 512 * 1024 * 1024
    git_timeout: Seconds = 120.0
    git_allowed_schemes: tuple[str, ...] = ("https", "ssh", "git")
    drain_timeout: Seconds = 60.0
    memory_trim_interval: Seconds = 60.0
    max_attempts: PositiveInt = 3
    keep_images: PositiveInt = 5
    history_days: Annotated[float, msgspec.Meta(ge=0)] = 90.0
    swarm_init: bool = False
    swarm_advertise_addr: str | None = None
    swarm_listen_addr: str = "0.0.0.0:2377"
    webhooks: tuple[WebhookConfig, ...] = ()
    build_server: BuildServerConfig | None = None
    # BuildKit unless the engine lacks it; "classic" for the deprecated classic builder.
    builder: Literal["buildkit", "classic"] = "buildkit"
    # The network of RUN steps: the engine's default bridge, as `docker build` gives them;
    # "host" for an engine without one (dockerd --bridge=none); "none" to cut them off.
    build_network: Literal["default", "host", "none"] = "default"
    # BuildKit's build cache on the building engine is kept under this many bytes.
    build_cache_max: Annotated[int, msgspec.Meta(ge=0)] = 10 * 1024**3
    stage_timeouts: StageTimeouts = msgspec.field(default_factory=StageTimeouts)

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("listen must be HOST:PORT, for example 0.0.0.0:7443")
        if len(self.api_token) < 16:
            raise ValueError("api_token must be at least 16 characters")
        if self.stage_timeouts.pushing <= self.push_retry_budget:
            raise ValueError("stage_timeouts.pushing must exceed push_retry_budget")
        urls = [hook.url for hook in self.webhooks]
        if len(set(urls)) < len(urls):  # each event would go twice, signed with one secret
            raise ValueError("webhooks lists one url twice: give each receiver once")

    @property
    def host(self) -> str:
        """The address to listen on; an IPv6 one may be written in brackets, [::]:7443."""
        return self.listen.rpartition(":")[0].removeprefix("[").removesuffix("]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class WorkerConfig(_Value, frozen=True, forbid_unknown_fields=True, kw_only=True):
    leader_url: str
    join_token: str | None = None
    # left here unread only when that file is gone, or that variable unset: the token is
    # needed to enrol, so an enrolled worker starts without it
    join_token_file: str | None = None
    join_token_env: str | None = None
    name: str | None = None
    max_parallel_pulls: PositiveInt = 2
    pull_retry_budget: Seconds = 120.0

    def __post_init__(self) -> None:
        if not self.leader_url.startswith(("https://", "http://")):
            raise ValueError("leader_url must start with https:// (or http:// for plain HTTP)")


class RegistryConfig(_Value, frozen=True, forbid_unknown_fields=True, kw_only=True):
    server: str
    username: str
    password: str | None = None
    # A command whose first line of output is the password, for short-lived tokens (ECR's
    # last 12 hours): run at start and again every password_refresh_s.
    password_command: str | None = None
    password_refresh_s: Seconds = 6 * 3600.0
    namespace: str | None = None

    def __post_init__(self) -> None:
        if (self.password is None) == (self.password_command is None):
            raise ValueError(
                "give exactly one of password (or password_file, password_env) and password_command"
            )


class Config(_Value, frozen=True, forbid_unknown_fields=True, kw_only=True):
    role: Literal["leader", "worker"]
    state_dir: str = "/var/lib/deploy-agent"
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    leader: LeaderConfig | None = None
    worker: WorkerConfig | None = None
    registry: RegistryConfig | None = None

    def __post_init__(self) -> None:
        if self.role == "leader" and self.leader is None:
            raise ValueError("role = 'leader' needs a [leader] table")
        if self.role == "worker" and self.worker is None:
            raise ValueError("role = 'worker' needs a [worker] table")

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    def secrets(self) -> list[str]:
        """Every secret value this config holds, for the log redactor."""
        found = [self.leader.api_token] if self.leader else []
        found += [hook.secret for hook in self.leader.webhooks] if self.leader else []
        if self.registry and self.registry.password:
            found.append(self.registry.password)
        if self.worker and self.worker.join_token:
            found.append(self.worker.join_token)
        return found


# Secrets needed for a first start only: a worker enrolled may lose its join token file.
_NEEDED_ONCE = frozenset({"worker.join_token"})
_SECRET_KEYS = {"leader": ("api_token",), "registry": ("password",), "worker": ("join_token",)}


# In place of a secret the caller does not need (the command line reading a leader's
# config needs its API token at most): long enough for any secret's minimum length.
UNREAD_SECRET = "(not read: not needed here)"  # noqa: S105 (a placeholder, no secret)


def load_config(
    path: str | Path,
    *,
    needed: frozenset[str] | None = None,
    unset_env: list[str] | None = None,
) -> Config:
    """Read, resolve secrets in and validate the config file at `path`. With `needed`,
    only the secrets named there (`leader.api_token`, say) are read; the others, which
    may come from the service's own environment, are left unread. With `unset_env`, a
    secret whose environment variable is not set here is noted there, not an error."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse_config(raw, needed=needed, unset_env=unset_env)


def parse_config(
    raw: dict[str, Any],
    *,
    needed: frozenset[str] | None = None,
    unset_env: list[str] | None = None,
) -> Config:
    for table, keys in _SECRET_KEYS.items():
        section = raw.get(table)
        if isinstance(section, dict):
            for key in keys:
                _resolve_secret(section, key, f"{table}.{key}", needed, unset_env)
    hooks = raw.get("leader", {}).get("webhooks") if isinstance(raw.get("leader"), dict) else None
    for index, hook in enumerate(hooks if isinstance(hooks, list) else []):
        if isinstance(hook, dict):
            name = f"leader.webhooks[{index}].secret"
            _resolve_secret(hook, "secret", name, needed, unset_env)
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _resolve_secret(
    section: dict[str, Any],
    key: str,
    name: str,
    needed: frozenset[str] | None,
    unset_env: list[str] | None,
) -> None:
    given = [k for k in (key, f"{key}_file", f"{key}_env") if k in section]
    if len(given) > 1:
        raise ConfigError(f"{name}: give only one of {', '.join(given)}")
    if given and needed is not None and name not in needed:
        section.pop(given[0])
        section[key] = UNREAD_SECRET
        return
    if f"{key}_file" in section:
        path = section[f"{key}_file"]
        if name in _NEEDED_ONCE and isinstance(path, str) and not Path(path).exists():
            return  # kept as a path: the worker reports it only if it has to enrol
        section[key] = _read_secret_file(section.pop(f"{key}_file"), f"{name}_file")
    elif f"{key}_env" in section:
        var = section[f"{key}_env"]
        if name in _NEEDED_ONCE and isinstance(var, str) and not os.environ.get(var, "").strip():
            if unset_env is not None:
                unset_env.append(f"{name}_env: {var}")
            return  # kept as a name: the worker reports it only if it has to enrol
        section.pop(f"{key}_env")
        try:
            section[key] = _read_secret_env(var, f"{name}_env")
        except ConfigError:
            if unset_env is None or not isinstance(var, str):
                raise
            unset_env.append(f"{name}_env: {var}")  # unset here: noted, not an error
            section[key] = UNREAD_SECRET


def _read_secret_file(path: object, name: str) -> str:
    if not isinstance(path, str):
        raise ConfigError(f"{name}: expected a file path")
    try:
        lines = Path(path).read_text().strip().splitlines()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
    value = lines[0].strip() if lines else ""
    if not value:
        raise ConfigError(f"{name}: {path} is empty")
    return value


def _read_secret_env(var: object, name: str) -> str:
    if not isinstance(var, str):
        raise ConfigError(f"{name}: expected an environment variable name")
    value = os.environ.get(var, "").strip()
    if not value:
        raise ConfigError(f"{name}: environment variable {var} is not set or empty")
    return value


def _describe(exc: msgspec.ValidationError) -> str:
    """Turn msgspec's `… - at `$.leader.port`` into `leader.port: …`."""
    text = str(exc)
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        return f"config: {text}"
    key = where.rstrip("`").removeprefix("$").lstrip(".") or "(top level)"
    return f"{key}: {message}"
