"""Configuration: one TOML file loaded once into frozen, typed values.

Every error names the key it is about. Secrets may be given inline, or as `KEY_file`
(a path) or `KEY_env` (an environment variable name); exactly one of the three.
"""

from __future__ import annotations

import os
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from agent import engine_url
from agent.errors import ConfigError
from agent.ssh_target import SshTarget
from agent.validation import explain, required_key, unknown_key

Seconds = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class _Value(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every config table: immutable, and an unknown key is an error."""


class LogConfig(_Value, frozen=True, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


DOCKER_SOCKET = "unix:///var/run/docker.sock"


def _engine_url() -> str:
    """The engine the docker CLI here talks to: DOCKER_HOST, else Docker's own socket."""
    return os.environ.get("DOCKER_HOST", "").strip() or DOCKER_SOCKET


class EngineConfig(_Value, frozen=True, forbid_unknown_fields=True, kw_only=True):
    url: str = msgspec.field(default_factory=_engine_url)
    timeout: Seconds = 30.0

    def __post_init__(self) -> None:
        engine_url.normalized(self.url)  # a ConfigError now, not a traceback at start


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
        problems = []
        for key in ("known_hosts", "identity_file"):
            path = getattr(self, key)
            try:
                found = path is None or Path(path).is_file()
            except OSError as exc:  # a directory this user may not search
                problems.append(f"leader.build_server.{key}: {path}: {exc.strerror}")
                continue
            if not found:
                problems.append(f"leader.build_server.{key}: {path} is not a file")
        if problems:
            raise ConfigErrors(problems)


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
    api_token_file: str | None = None  # where api_token was read, to check who may read it

    def __post_init__(self) -> None:
        problems = []
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            problems.append("listen must be HOST:PORT, for example 0.0.0.0:7443")
        if len(self.api_token) < 16:
            problems.append("api_token must be at least 16 characters")
        if self.stage_timeouts.pushing <= self.push_retry_budget:
            problems.append("stage_timeouts.pushing must exceed push_retry_budget")
        urls = [hook.url for hook in self.webhooks]
        if len(set(urls)) < len(urls):  # each event would go twice, signed with one secret
            problems.append("webhooks lists one url twice: give each receiver once")
        if problems:  # all of them, a line each: the loader reports each under its table
            raise ValueError("\n".join(problems))

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
# Secrets whose file stays named in the config: the leader checks who may read it.
_PATH_KEPT = frozenset({"leader.api_token"})
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
    """Validate `raw` into a Config; every problem found is reported at once, each
    starting with its key (ConfigErrors, whose message lists them a line each)."""
    problems = _resolve_secrets(raw, needed, unset_env)
    problems += problems_of(raw, Config, "")
    if problems:
        raise ConfigErrors(problems)
    return msgspec.convert(raw, Config)


class ConfigErrors(ConfigError):
    """One or more problems in a config, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


def _resolve_secrets(
    raw: dict[str, Any], needed: frozenset[str] | None, unset_env: list[str] | None
) -> list[str]:
    """Put each secret in place of its `_file` or `_env` key; the problems found."""
    places: list[tuple[dict[str, Any], str, str]] = []
    for table, keys in _SECRET_KEYS.items():
        if isinstance(section := raw.get(table), dict):
            places += [(section, key, f"{table}.{key}") for key in keys]
    hooks = raw.get("leader", {}).get("webhooks") if isinstance(raw.get("leader"), dict) else None
    for index, hook in enumerate(hooks if isinstance(hooks, list) else []):
        if isinstance(hook, dict):
            places.append((hook, "secret", f"leader.webhooks[{index}].secret"))
    problems = []
    for section, key, name in places:
        try:
            _resolve_secret(section, key, name, needed, unset_env)
        except ConfigError as exc:
            problems.append(exc.message)
            section[key] = UNREAD_SECRET  # told once: not "missing" again below
    return problems


def problems_of(value: object, kind: Any, key: str) -> list[str]:
    """What is wrong with `value` as a `kind`, at `key`: msgspec stops at a struct's
    first error, so each table is checked key by key, its nested tables in turn, and
    its own checks (__post_init__) run once its keys are each valid."""
    struct = _struct_in(kind, value)
    if struct is not None:
        assert isinstance(value, dict)
        return _table_problems(value, struct, key)
    if _is_table_list(kind) and isinstance(value, list):
        (item,) = {arg for arg in typing.get_args(kind) if arg is not Ellipsis}
        return [p for i, entry in enumerate(value) for p in problems_of(entry, item, f"{key}[{i}]")]
    try:
        msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        return [_describe(exc, kind, value, key)]
    return []


def _table_problems(table: dict[str, Any], struct: type[msgspec.Struct], key: str) -> list[str]:
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    where = key or "(top level)"
    problems = [f"{where}: {unknown_key(k, list(fields))}" for k in table if k not in fields]
    for name, info in fields.items():
        if name in table:
            problems += problems_of(table[name], info.type, f"{key}.{name}" if key else name)
        elif info.required:
            problems.append(f"{where}: {_required(key, name)}")
    if problems:
        return problems
    try:
        msgspec.convert(table, struct)
    except msgspec.ValidationError as exc:
        where, _, said = _describe(exc, struct, table, key).partition(": ")
        return [f"{where}: {line}" for line in said.splitlines()]
    return []


def _struct_in(kind: Any, value: object) -> type[msgspec.Struct] | None:
    """The table type that `kind` (a struct, or a struct or None) gives a dict `value`."""
    if not isinstance(value, dict):
        return None
    for candidate in (kind, *typing.get_args(kind)):
        if isinstance(candidate, type) and issubclass(candidate, msgspec.Struct):
            return candidate
    return None


def _is_table_list(kind: Any) -> bool:
    """Whether `kind` is a tuple of tables (`tuple[WebhookConfig, ...]`)."""
    return typing.get_origin(kind) is tuple and _struct_in(typing.get_args(kind)[0], {}) is not None


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
        _secret_from_file(section, key, name)
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


def _secret_from_file(section: dict[str, Any], key: str, name: str) -> None:
    path = section[f"{key}_file"]
    if name in _NEEDED_ONCE and isinstance(path, str) and not Path(path).exists():
        return  # kept as a path: the worker reports it only if it has to enrol
    section[key] = _read_secret_file(section.pop(f"{key}_file"), f"{name}_file")
    if name in _PATH_KEPT:
        section[f"{key}_file"] = path


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


def _describe(exc: msgspec.ValidationError, kind: Any, value: object, key: str) -> str:
    """`leader.max_parallel_builds: must be a whole number, at least 1, not 0`: what is
    wrong with `value` (a `kind`, at `key`), in words."""
    inner, message = explain(exc, kind, value, within=key)
    if inner and key:
        full = key + inner if inner.startswith("[") else f"{key}.{inner}"
    else:
        full = key or inner
    return f"{full or '(top level)'}: {message}"


def _required(table: str, name: str) -> str:
    """A missing key; a secret may also come as KEY_file or KEY_env."""
    said = required_key(name)
    if name in _SECRET_KEYS.get(table, ()):
        said += f" (or {name}_file, or {name}_env)"
    return said
