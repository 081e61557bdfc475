"""Where an SSH connection goes, parsed from `ssh://user@host[:port]`.

Apart from `agent.ssh` so that reading a config or a command line never imports the
SSH library: only the code that connects does.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class SshTarget:
    user: str
    host: str
    port: int = 22

    @classmethod
    def parse(cls, url: str) -> SshTarget:
        """`ssh://user@host[:port]`, as given on the command line."""
        parts = urlsplit(url)
        if parts.scheme != "ssh" or not parts.hostname or not parts.username:
            raise ValueError(f"{url!r} is not ssh://user@host[:port]")
        if parts.password is not None or parts.path not in ("", "/"):
            raise ValueError(f"{url!r}: only ssh://user@host[:port], no password or path")
        try:
            port = 22 if parts.port is None else parts.port
        except ValueError:
            raise ValueError(
                f"{url!r}: the port must be 1 to 65535 in ssh://user@host:port"
            ) from None
        if port == 0:
            raise ValueError(f"{url!r}: the port must be 1 to 65535 in ssh://user@host:port")
        return cls(parts.username, parts.hostname, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"
