"""Worker agents for tests: real `deploy-agent run` processes with a worker config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.canary import CANARY
from tests.support.procs import stop
from tests.support.toml import to_toml

JOIN_TOKEN_ENV = "DEPLOY_AGENT_TEST_JOIN_TOKEN"


class WorkerProcess:
    """The join token reaches the worker through the environment, never its config file."""

    def __init__(
        self,
        workdir: Path,
        *,
        name: str,
        engine_url: str,
        leader_url: str,
        token: str,
        prefix: list[str] | None = None,
        python: str = sys.executable,
        command: list[str] | None = None,
        **worker: Any,
    ) -> None:
        self.name = name
        self.python = python  # another virtualenv's: an earlier release of the agent
        # what starts the agent, before `run -c CONFIG` (a guard, say)
        self.command = command or [python, "-m", "agent"]
        self.prefix = prefix or []  # e.g. nsenter into a simulated host's namespace
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.config_path = workdir / "worker.toml"
        self.log_path = workdir / "worker.log"
        raw = {
            "role": "worker",
            "state_dir": str(self.state_dir),
            "log": {"format": "json"},
            "engine": {"url": engine_url},
            "worker": {
                "leader_url": leader_url,
                "join_token_env": JOIN_TOKEN_ENV,
                "name": name,
                **worker,
            },
        }
        self.config_path.write_text(to_toml(raw))
        self.join_token = token
        self.proc: subprocess.Popen[bytes] | None = None
        CANARY.logs.add(self.log_path)

    def start(self, env: dict[str, str] | None = None) -> WorkerProcess:
        """Start it; `env` adds to the test's environment."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, *self.command, "run", "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                # not the checkout: `-m agent` would import its code whatever `python` is
                cwd=self.workdir,
                # not as a service: a guard that finds INVOCATION_ID leaves restarts to systemd
                env={**_outside_systemd(), **(env or {}), JOIN_TOKEN_ENV: self.join_token},
            )
        CANARY.sample_argv()
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def terminate(self) -> int | None:
        if self.proc is None:
            return None
        stop(self.proc, 15)
        return self.proc.returncode

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def _outside_systemd() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "INVOCATION_ID"}
