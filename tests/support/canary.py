"""One set of canary secrets for the whole test run, and the scan that must find none.

Every leader, worker and registry the tests start uses these values; join tokens and node
secrets, which the leader issues, join the set as they appear. At the end of the run the
scan searches process logs, captured test output, every API response (but for the one
that hands a join token or node secret out), sampled process argument lists and every
file under the run's temporary directories. The only files a secret may be in are the
credential stores: the leader's SQLite database (`leader.db` and its `-wal`/`-shm` files),
a worker's own 0600 identity file (`node.json`, its node secret) and the 0600 `join-token`
file a bootstrapped worker host holds (with the operator's file it was copied from).
The tests give secrets to the daemons through environment variables, never a file or argv.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent.tls import JoinTokenError, parse_join_token
from agent.worker.identity import IDENTITY_FILE

# parallel test processes inherit the first one's marker through the environment
MARKER_ENV = "DEPLOY_AGENT_TEST_CANARY"
CREDENTIAL_STORES = ("leader.db", "leader.db-wal", "leader.db-shm", IDENTITY_FILE, "join-token")


@dataclass
class Canary:
    """The secrets of one run and every place the tests saw that might hold one."""

    marker: str = field(default_factory=lambda: os.environ.get(MARKER_ENV) or secrets.token_hex(6))
    issued: set[str] = field(default_factory=set)
    texts: dict[str, str] = field(default_factory=dict)
    logs: set[Path] = field(default_factory=set)
    responses: list[list[str]] = field(default_factory=list)
    argv: set[str] = field(default_factory=set)
    searched: int = 0  # places the last scan searched
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def api_token(self) -> str:
        return f"canary-api-token-{self.marker}"

    @property
    def registry_password(self) -> str:
        return f"canary-registry-password-{self.marker}"

    def secrets(self) -> set[str]:
        return {self.api_token, self.registry_password, *self.issued}

    def issue(self, secret: str) -> None:
        """A join token or node secret the leader handed out: search for it too."""
        with self._lock:
            self.issued.add(secret)
            with contextlib.suppress(JoinTokenError):
                self.issued.add(parse_join_token(secret)[1])  # a join token's secret alone

    def keep(self, where: str, text: str) -> None:
        """Text that will be gone by the end of the run (a deleted log, captured output)."""
        with self._lock:
            self.texts[where] = self.texts.get(where, "") + text

    def sample_argv(self) -> None:
        run = subprocess.run(
            ["ps", "-eo", "args"], capture_output=True, text=True, timeout=10, check=True
        )
        with self._lock:
            self.argv.update(run.stdout.splitlines())

    def scan(self, roots: Iterable[Path]) -> list[str]:
        """Every place a secret was found, as 'place: which secret'; empty when clean."""
        for root in roots:
            for identity in root.rglob(IDENTITY_FILE):
                self._learn_node_secret(identity)
        places = dict(self.texts)
        places |= {f"log {path}": _read(path) for path in self.logs}
        places |= {f"API response {i}": text for i, text in enumerate(self._all_responses())}
        places["process argv"] = "\n".join(sorted(self.argv))
        for root in roots:
            places |= {f"file {path}": _read(path) for path in _files_outside_stores(root)}
        found = self.secrets()
        self.searched = len(places)
        return [f"{place}: {s[:24]}…" for place, text in places.items() for s in found if s in text]

    def _all_responses(self) -> list[str]:
        return [text for seen in self.responses for text in seen]

    def _learn_node_secret(self, path: Path) -> None:
        text = _read(path)
        marker = '"secret":"'
        if marker in text:
            self.issue(text.split(marker, 1)[1].split('"', 1)[0])


def _files_outside_stores(root: Path) -> list[Path]:
    if not root.exists():
        return []
    return [p for p in root.rglob("*") if p.is_file() and p.name not in CREDENTIAL_STORES]


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""


CANARY = Canary()
