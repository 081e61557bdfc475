"""What a bootstrap will do, checked before it starts: the host, the leader, the paths.

The join token is held here and nowhere else; it never appears in a repr or a log line.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

from agent.ssh_target import SshTarget
from agent.tls import JoinTokenError, parse_join_token

NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
UNIT_NAME = "deploy-agent-worker.service"
DEFAULT_STATE_DIR = "/var/lib/deploy-agent"


@dataclass(frozen=True, kw_only=True)
class Plan:
    target: SshTarget
    leader_url: str
    join_token: str = field(repr=False)
    known_hosts: Path
    identity: Path | None = None
    name: str | None = None
    wheel: Path | None = None
    wheelhouse: Path | None = None
    prefix: str = "/opt/deploy-agent"
    config_dir: str = "/etc/deploy-agent"
    state_dir: str = DEFAULT_STATE_DIR
    unit_dir: str = "/etc/systemd/system"
    engine_url: str = "unix:///var/run/docker.sock"
    wait_seconds: float = 120.0

    def __post_init__(self) -> None:
        if not self.leader_url.startswith("https://"):
            # workers join over TLS only: over http the token would cross in the clear
            raise ValueError("--leader-url must start with https://")
        if self.name is not None and not NODE_NAME.match(self.name):
            raise ValueError("--name: letters, digits, '.', '_' and '-', at most 63")
        for flag, path in (
            ("--prefix", self.prefix),
            ("--config-dir", self.config_dir),
            ("--state-dir", self.state_dir),
            ("--unit-dir", self.unit_dir),
        ):
            if not posixpath.isabs(path):
                raise ValueError(f"{flag} must be an absolute path on the host")
        if not self.known_hosts.is_file():
            raise ValueError(
                f"--known-hosts: no file at {self.known_hosts}; add the host's key to it "
                "(after checking its fingerprint)"
            )
        if not self.join_token.strip():
            raise ValueError("--join-token-file is empty")
        try:
            parse_join_token(self.join_token.strip())
        except JoinTokenError:
            raise ValueError(
                "--join-token-file does not hold a join token (DAT1-…): is it another "
                "secret, such as the API token of --token-file? Get one with "
                "`deploy-agent join-token` on the leader"
            ) from None

    # The releases layout: PREFIX/releases/VERSION/venv per release, `current` the one
    # the guard (PREFIX/bin/deploy-agent-guard) starts; workers upgrade themselves there.

    @property
    def releases_dir(self) -> str:
        return posixpath.join(self.prefix, "releases")

    def venv(self, version: str) -> str:
        return posixpath.join(self.releases_dir, version, "venv")

    @property
    def guard_path(self) -> str:
        return posixpath.join(self.prefix, "bin", "deploy-agent-guard")

    @property
    def agent_bin(self) -> str:
        """The current release's program."""
        return posixpath.join(self.releases_dir, "current", "venv", "bin", "deploy-agent")

    @property
    def wheels_dir(self) -> str:
        return posixpath.join(self.prefix, "wheels")

    @property
    def config_path(self) -> str:
        return posixpath.join(self.config_dir, "config.toml")

    @property
    def token_path(self) -> str:
        return posixpath.join(self.config_dir, "join-token")

    @property
    def unit_path(self) -> str:
        return posixpath.join(self.unit_dir, UNIT_NAME)

    @property
    def pid_path(self) -> str:
        return posixpath.join(self.prefix, "agent.pid")

    @property
    def log_path(self) -> str:
        return posixpath.join(self.prefix, "agent.log")

    @property
    def identity_path(self) -> str:
        return posixpath.join(self.state_dir, "node.json")
