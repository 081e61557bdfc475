"""Leaders for tests: in the test's own event loop, or as a real `deploy-agent run` process."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.config import Config, parse_config
from agent.leader.server import Leader
from tests.support.api import Api
from tests.support.canary import CANARY
from tests.support.procs import free_port, port_open, stop, wait_until
from tests.support.toml import to_toml

TOKEN = CANARY.api_token
TOKEN_ENV = "DEPLOY_AGENT_TEST_API_TOKEN"
# Leader keys that leader_config sets and the previous release does not know.
KEYS_OF_THIS_RELEASE = ("build_network",)


def leader_config(state_dir: Path, engine_url: str, **overrides: Any) -> dict[str, Any]:
    port = free_port()
    raw: dict[str, Any] = {
        "role": "leader",
        "state_dir": str(state_dir),
        "log": {"level": "info", "format": "json"},
        "engine": {"url": engine_url},
        "leader": {
            "listen": f"127.0.0.1:{port}",
            "plain_http": True,
            "api_token": TOKEN,
            "push_retry_budget": 30,
            "git_allowed_schemes": ["file", "https"],
            # the tests' engines run with --bridge=none: RUN steps get the host's network
            "build_network": "host",
            "drain_timeout": 10,
            "stage_timeouts": {"building": 120, "pushing": 60},
        },
    }
    return _merge(raw, overrides)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def base_url(raw: dict[str, Any]) -> str:
    scheme = "http" if raw["leader"].get("plain_http") else "https"
    return f"{scheme}://{raw['leader']['listen']}"


def _trust_leader(api: Api, raw: dict[str, Any]) -> None:
    if not raw["leader"].get("plain_http"):
        api.trust(Path(raw["state_dir"]) / "tls" / "ca.pem")


class InProcessLeader:
    """The real Leader in the test's loop: fast, and its parts are inspectable."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.config: Config = parse_config(copy.deepcopy(raw))
        self.leader = Leader(self.config)
        assert self.config.leader is not None
        self.api = Api(base_url(raw), self.config.leader.api_token)

    async def start(self) -> InProcessLeader:
        await self.leader.start()
        _trust_leader(self.api, self.raw)
        return self

    @property
    def url(self) -> str:
        return self.api.base_url

    async def stop(self) -> None:
        await self.api.close()
        await self.leader.stop()


class LeaderProcess:
    """`deploy-agent run -c FILE` as its own process, logging to a file.

    The API token reaches it through the environment, so no file of the test's holds it.
    """

    def __init__(
        self,
        raw: dict[str, Any],
        workdir: Path,
        prefix: list[str] | None = None,
        python: str = sys.executable,
    ) -> None:
        """`prefix` runs it elsewhere, e.g. nsenter into a simulated host's namespace;
        `python`, another virtualenv's (an earlier release). `raw` is copied: the API
        token moves from the file to the environment here."""
        self.python = python
        raw = copy.deepcopy(raw)
        if python != sys.executable:  # an earlier release refuses the keys it does not know
            for key in KEYS_OF_THIS_RELEASE:
                raw["leader"].pop(key, None)
        token = raw["leader"].pop("api_token", None)
        self.secret_env = {TOKEN_ENV: token} if token else {}
        if token:
            raw["leader"]["api_token_env"] = TOKEN_ENV
        self.raw = raw
        self.prefix = prefix or []
        self.workdir = workdir
        self.config_path = workdir / "leader.toml"
        self.config_path.write_text(to_toml(raw))
        assert tomllib.loads(self.config_path.read_text())  # the file is what the test meant
        self.log_path = workdir / "leader.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._api: Api | None = None
        self.token = token or ""
        CANARY.logs.add(self.log_path)

    @property
    def api(self) -> Api:
        """A client of its API, made on first use (it needs a running event loop)."""
        if self._api is None:
            self._api = Api(base_url(self.raw), self.token)
            if self.proc is not None:
                _trust_leader(self._api, self.raw)
        return self._api

    def start(self, env: Mapping[str, str] | None = None) -> None:
        """Start it and wait until it listens; `env` adds to the test's environment."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, self.python, "-m", "agent", "run", "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                # not the checkout: `-m agent` would import its code whatever `python` is
                cwd=self.workdir,
                env={**os.environ, **self.secret_env, **(env or {})},
            )
        host, _, port = self.raw["leader"]["listen"].rpartition(":")
        host = "127.0.0.1" if host == "0.0.0.0" else host
        wait_until(lambda: self._alive() and port_open(int(port), host), 30, "leader process")
        if self._api is not None:
            _trust_leader(self._api, self.raw)
        CANARY.sample_argv()

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"leader exited: {self.log_path.read_text()[-3000:]}")
        return True

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        stop(self.proc, timeout)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
