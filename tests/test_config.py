"""Configuration: the example file is valid, and each mistake names its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent import engine_url
from agent.config import load_config, parse_config
from agent.engine import Engine
from agent.errors import ConfigError
from agent.worker.agent import Worker
from agent.worker.identity import Identity, save_identity

EXAMPLE = Path(__file__).parent.parent / "config.example.toml"


def _raw(**leader: Any) -> dict[str, Any]:
    return {"role": "leader", "leader": {"api_token": "t" * 20, "plain_http": True, **leader}}


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """config.example.toml loads as it ships, so the documented keys are real."""
    monkeypatch.setenv("DEPLOY_AGENT_API_TOKEN", "example-token-0123456789")
    config = load_config(EXAMPLE)
    assert config.leader is not None
    assert config.leader.push_retry_budget == 300


def test_engine_defaults_to_docker_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without `[engine] url` the agent talks to the engine DOCKER_HOST names, as the docker
    CLI beside it does, else to Docker's own socket; a url in the file wins over both."""
    monkeypatch.setenv("DOCKER_HOST", "unix:///tmp/other/docker.sock")
    assert parse_config(_raw()).engine.url == "unix:///tmp/other/docker.sock"
    given = parse_config(_raw() | {"engine": {"url": "tcp://127.0.0.1:2375"}})
    assert given.engine.url == "tcp://127.0.0.1:2375"
    monkeypatch.delenv("DOCKER_HOST")
    assert parse_config(_raw()).engine.url == "unix:///var/run/docker.sock"


@pytest.mark.parametrize(
    ("leader", "key"),
    [
        ({"max_parallel_builds": "two"}, "leader.max_parallel_builds"),
        ({"max_parallel_builds": 0}, "leader.max_parallel_builds"),
        ({"colour": "red"}, "leader"),
        ({"listen": "nohost"}, "leader"),
        ({"stage_timeouts": {"pushing": 10}}, "leader"),
        ({"stage_timeouts": {"brewing": 10}}, "leader.stage_timeouts"),
        (  # each event would be sent twice, both signed with the second secret
            {"webhooks": [{"url": "https://cp.test/h", "secret": s * 16} for s in "ab"]},
            "leader",
        ),
    ],
)
def test_errors_name_the_key(leader: dict[str, Any], key: str) -> None:
    """A wrong value or an unknown key is a ConfigError that starts with the key's path."""
    with pytest.raises(ConfigError) as caught:
        parse_config(_raw(**leader))
    assert caught.value.message.startswith(key + ":"), caught.value.message


def test_every_problem_is_reported_at_once_each_naming_its_key() -> None:
    """A config with a mistake in several tables, several in one table and a secret that
    cannot be read gets them all in one error, one line each, each starting with its key."""
    raw = {
        "role": "leader",
        "log": {"level": "loud"},
        "engine": {"timeout": -1},
        "leader": {
            "api_token_env": "DEPLOY_AGENT_TEST_NO_SUCH_VARIABLE",
            "max_parallel_builds": "two",
            "keep_images": 0,
            "colour": "red",
            "stage_timeouts": {"pushing": -1, "brewing": 1},
            "webhooks": [{"url": "ftp://cp.test/h", "secret": "s" * 16}],
        },
        "registry": {"server": "r.test", "username": "u", "password": "p", "namespace": 7},
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    keys = [line.split(": ", 1)[0] for line in caught.value.message.splitlines()]
    assert sorted(keys) == sorted(
        [
            "leader.api_token_env",
            "log.level",
            "engine.timeout",
            "leader",  # the unknown key `colour`
            "leader.max_parallel_builds",
            "leader.keep_images",
            "leader.stage_timeouts",  # the unknown key `brewing`
            "leader.stage_timeouts.pushing",
            "leader.webhooks[0].url",
            "registry.namespace",
        ]
    ), caught.value.message
    assert "`colour`" in caught.value.message and "`brewing`" in caught.value.message


def test_a_tables_own_checks_are_all_reported() -> None:
    """Checks across a table's keys (listen, api_token length) are each reported too."""
    with pytest.raises(ConfigError) as caught:
        parse_config(_raw(listen="nohost", api_token="short"))
    lines = caught.value.message.splitlines()
    assert len(lines) == 2 and all(line.startswith("leader: ") for line in lines), lines


@pytest.mark.parametrize("port", ["99999", "0"])
def test_a_build_server_port_out_of_range_is_a_config_error(port: str, tmp_path: Path) -> None:
    """Found when the config loads, not at the first build (port 0 became 22 before)."""
    server = {"ssh": f"ssh://builder@build.example:{port}", "known_hosts": str(tmp_path)}
    with pytest.raises(ConfigError) as caught:
        parse_config(_raw(build_server=server))
    assert caught.value.message.startswith("leader.build_server:"), caught.value.message
    assert "the port must be 1 to 65535" in caught.value.message


def test_a_build_servers_missing_known_hosts_is_found_at_start_not_by_every_reader(
    tmp_path: Path,
) -> None:
    """The leader's start and check-config find a known_hosts file that is not there;
    the command line, which reads the config for the leader's address, does not care."""
    server = {"ssh": "ssh://builder@build.example", "known_hosts": str(tmp_path / "missing")}
    config = parse_config(_raw(build_server=server))
    assert config.leader is not None and config.leader.build_server is not None

    with pytest.raises(ConfigError, match=r"leader\.build_server\.known_hosts: .* is not a file"):
        config.leader.build_server.check_files()


def test_missing_token_is_named() -> None:
    """Without api_token the error names it."""
    with pytest.raises(ConfigError, match="api_token"):
        parse_config({"role": "leader", "leader": {"plain_http": True}})


def test_secret_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """api_token_file and password_env fill the secrets in place of inline values."""
    token = tmp_path / "token"
    token.write_text("from-a-file-0123456789\n")
    monkeypatch.setenv("REG_PW", "from-the-env")
    raw = {
        "role": "leader",
        "leader": {"api_token_file": str(token), "plain_http": True},
        "registry": {"server": "r.example", "username": "u", "password_env": "REG_PW"},
    }
    config = parse_config(raw)
    assert config.leader is not None and config.registry is not None
    assert config.leader.api_token == "from-a-file-0123456789"
    assert config.registry.password == "from-the-env"


@pytest.mark.parametrize(
    ("leader", "message"),
    [
        ({"api_token": "x" * 20, "api_token_env": "X"}, "give only one"),
        ({"api_token_env": "SURELY_NOT_SET_ANYWHERE"}, "is not set"),
        ({"api_token_file": "/nonexistent/token"}, "cannot read"),
    ],
)
def test_secret_sources_that_cannot_work_are_refused(leader: dict[str, Any], message: str) -> None:
    """Two sources, an unset variable or an unreadable file each get a clear error."""
    with pytest.raises(ConfigError, match=message) as caught:
        parse_config({"role": "leader", "leader": {"plain_http": True, **leader}})
    assert caught.value.message.startswith("leader.api_token")


def test_invalid_toml_says_so(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("role = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_worker_config_needs_a_leader_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker config parses with its table, and a bad leader_url is named."""
    config = parse_config(
        {"role": "worker", "worker": {"leader_url": "https://l:7443", "join_token": "DAT1-x"}}
    )
    assert config.worker is not None and config.worker.max_parallel_pulls == 2
    with pytest.raises(ConfigError, match=r"^worker:.*leader_url"):
        parse_config({"role": "worker", "worker": {"leader_url": "leader:7443"}})
    with pytest.raises(ConfigError, match="worker"):
        parse_config({"role": "worker"})


@pytest.mark.parametrize("source", ["file", "env"])
async def test_an_enrolled_worker_starts_without_its_join_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    """The join token is needed to enrol only: with its file gone, or its variable
    unset, the config still loads, an enrolled worker uses its identity, and one that
    must enrol names what is missing."""
    gone = tmp_path / "join-token"
    variable = "DEPLOY_AGENT_TEST_JOIN_TOKEN"
    monkeypatch.delenv(variable, raising=False)
    raw = {"role": "worker", "state_dir": str(tmp_path / "state")}
    given = {"join_token_file": str(gone)} if source == "file" else {"join_token_env": variable}
    worker = {"leader_url": "https://l:7443", **given}
    config = parse_config({**raw, "worker": dict(worker)})
    assert config.worker is not None and config.worker.join_token is None

    worker_agent = Worker(config)
    missing = f"join_token_file: {gone} does not exist" if source == "file" else variable
    try:
        with pytest.raises(ConfigError, match=missing):
            await worker_agent._identity()
        kept = Identity(node_id="n-1", secret="s" * 43, leader_url="https://l:7443", ca_pem=None)
        save_identity(config.state_path, kept)
        assert await worker_agent._identity() == kept
    finally:
        await worker_agent.engine.close()

    token = "DAT1-" + "ab" * 32 + "-secret"
    gone.write_text(token + "\n")
    monkeypatch.setenv(variable, token)
    config = parse_config({**raw, "worker": dict(worker)})
    assert config.worker is not None and config.worker.join_token == token


def test_registry_password_comes_from_exactly_one_source(tmp_path: Path) -> None:
    """A password, or a password_command, never both or neither; a password file gives
    its first line."""
    base = {"role": "leader", "leader": {"api_token": "t" * 32}}
    registry = {"server": "r.example.com", "username": "u"}
    command = {"password_command": "aws ecr get-login-password", "password_refresh_s": 3600}
    config = parse_config({**base, "registry": {**registry, **command}})
    assert config.registry is not None and config.registry.password is None
    for wrong in ({**registry, **command, "password": "p"}, registry):
        with pytest.raises(ConfigError, match="exactly one of password"):
            parse_config({**base, "registry": wrong})
    secret = tmp_path / "password"
    secret.write_text("first-line\nsecond-line\n")
    config = parse_config({**base, "registry": {**registry, "password_file": str(secret)}})
    assert config.registry is not None and config.registry.password == "first-line"


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"role": "leeder"}, "role: must be one of 'leader', 'worker', not 'leeder'"),
        ({"logs": {"level": "debug"}}, "(top level): unknown key `logs`; did you mean `log`?"),
        ({"log": {"level": "loud"}}, "log.level: must be one of 'debug', 'error', 'info'"),
        (
            {"leader": {"api_token": "t" * 20, "max_parallel_builds": 0}},
            "leader.max_parallel_builds: must be a whole number, at least 1, not 0",
        ),
        (
            {"leader": {"api_token": "t" * 20, "stage_timeouts": {"biulding": 5}}},
            "leader.stage_timeouts: unknown key `biulding`; did you mean `building`?",
        ),
        (
            {
                "leader": {
                    "api_token": "t" * 20,
                    "webhooks": [{"url": "ftp://h", "secret": "s" * 16}],
                }
            },
            "leader.webhooks[0].url: must be an http:// or https:// URL",
        ),
        (
            {"leader": {}},
            "leader: `api_token` is required here (or api_token_file, or api_token_env)",
        ),
        (
            {"leader": {"api_token": "t" * 20}, "engine": {"url": "fd://"}},
            "engine.url (or DOCKER_HOST): not an engine address (scheme 'fd')",
        ),
        (
            {"leader": {"api_token": "t" * 20}, "engine": {"url": "unix://"}},
            "engine.url (or DOCKER_HOST): not an engine address (no unix:// address)",
        ),
    ],
)
def test_mistakes_are_told_in_the_products_words(raw: dict[str, Any], says: str) -> None:
    """A config mistake names the key, the allowed values or what a pattern stands for,
    and the nearest known key; none of msgspec's own wording (`Expected`, `$.`) leaks."""
    with pytest.raises(ConfigError) as caught:
        parse_config({"role": "leader"} | raw)
    message = caught.value.message
    assert message.startswith(says), message
    assert "ftp://h" not in message  # a webhook's URL may be its credential: not quoted
    assert "Expected" not in message and "$." not in message and "regex" not in message


@pytest.mark.parametrize(
    ("given", "tls", "url"),
    [
        ("unix:///run/docker.sock", False, "unix:///run/docker.sock"),
        ("10.0.0.5:2375", False, "tcp://10.0.0.5:2375"),
        ("tcp://engine.internal", False, "tcp://engine.internal:2375"),
        ("tcp://engine.internal", True, "tcp://engine.internal:2376"),
        ("https://engine.internal", False, "https://engine.internal:2376"),
        (" ssh://deploy@engine.internal ", False, "ssh://deploy@engine.internal"),
    ],
)
def test_the_engine_address_is_read_as_the_docker_cli_reads_docker_host(
    given: str, tls: bool, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`HOST:PORT` is TCP, and TCP without a port has Docker's own port (2376 with TLS):
    the address the engine client is given, from DOCKER_HOST as from engine.url."""
    monkeypatch.delenv("DOCKER_TLS_VERIFY", raising=False)
    if tls:
        monkeypatch.setenv("DOCKER_TLS_VERIFY", "1")
        monkeypatch.setenv("DOCKER_CERT_PATH", "/etc/docker/certs")
    monkeypatch.setenv("DOCKER_HOST", given)
    config = parse_config({"role": "leader", "leader": {"api_token": "t" * 20}})
    assert engine_url.normalized(config.engine.url) == url


async def test_the_engine_client_is_given_the_address_as_read() -> None:
    engine = Engine("10.0.0.5:2375", timeout=1)
    try:
        assert engine.url == "tcp://10.0.0.5:2375"
    finally:
        await engine.close()


def test_tls_to_the_engine_without_its_certificates_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DOCKER_TLS_VERIFY", "1")
    monkeypatch.delenv("DOCKER_CERT_PATH", raising=False)
    leader = {"api_token": "t" * 20}
    with pytest.raises(ConfigError, match="DOCKER_TLS_VERIFY=1 needs DOCKER_CERT_PATH"):
        parse_config({"role": "leader", "engine": {"url": "tcp://h:2376"}, "leader": leader})
