"""One set of canary secrets for the whole test run, and the scan that must find none.

Every leader, worker and registry the tests start uses these values; join tokens and node
secrets, which the leader issues, join the set as they appear. At the end of the run the
scan searches process logs, captured test output, every API response (but for the one
that hands a join token or node secret out), sampled process argument lists and every
file under the run's temporary directories. The only files a secret may be in are the
credential stores: the leader's SQLite database (`leader.db` and its `-wal`/`-shm` files),
a worker's own 0600 identity file (`node.json`, its node secret), the 0600 `join-token`
file a bootstrapped worker host holds (with the operator's file it was copied from), and
an operator's `api-token` file (`leader.api_token_file`). The tests give secrets to the
daemons through environment variables or those files, never argv.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import subprocess
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.tls import JoinTokenError, parse_join_token
from agent.worker.identity import IDENTITY_FILE

# parallel test processes inherit the first one's marker through the environment
MARKER_ENV = "DEPLOY_AGENT_TEST_CANARY"
CREDENTIAL_STORES = (
    *("leader.db", "leader.db-wal", "leader.db-shm"),
    *(IDENTITY_FILE, "join-token", "api-token"),
)


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
        """Every place a secret was found, as 'place: which secret'; empty when clean.
        Places are searched one at a time, as bytes: a run leaves gigabytes of files
        (virtualenvs, a 600 MiB test file), which decoding and holding at once made slow."""
        roots = list(roots)
        for root in roots:
            for identity in root.rglob(IDENTITY_FILE):
                self._learn_node_secret(identity)
        found = [(s, s.encode()) for s in self.secrets()]
        hits, self.searched = [], 0
        for place, data in self._places(roots):
            self.searched += 1
            hits += [f"{place}: {text[:24]}…" for text, raw in found if raw in data]
        return hits

    def _places(self, roots: list[Path]) -> Iterator[tuple[str, bytes]]:
        for where, text in self.texts.items():
            yield where, text.encode()
        for path in self.logs:
            yield f"log {path}", _read(path)
        for i, text in enumerate(self._all_responses()):
            yield f"API response {i}", text.encode()
        yield "process argv", "\n".join(sorted(self.argv)).encode()
        for root in roots:
            for path in _files_outside_stores(root):
                yield f"file {path}", _read(path)

    def _all_responses(self) -> list[str]:
        return [text for seen in self.responses for text in seen]

    def _learn_node_secret(self, path: Path) -> None:
        text = _read(path).decode(errors="replace")
        marker = '"secret":"'
        if marker in text:
            self.issue(text.split(marker, 1)[1].split('"', 1)[0])


# Not searched: installed packages (the virtualenvs that install tests make: 1 GB of
# files no agent writes to) and files over 16 MiB (the tests' own payloads: contexts,
# blobs, the uv binary; every log and state file of a run is far smaller).
INSTALLED = "site-packages"
LARGEST_BYTES = 16 << 20


def _files_outside_stores(root: Path) -> Iterator[Path]:
    if not root.exists():
        return
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d != INSTALLED]
        for name in files:
            path = Path(directory, name)
            if name not in CREDENTIAL_STORES and _small_file(path):
                yield path


def _small_file(path: Path) -> bool:
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size <= LARGEST_BYTES


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


CANARY = Canary()
