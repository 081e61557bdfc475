"""Registry credentials as one value, whose password never shows in a repr or a log."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RegistryCredentials:
    server: str
    username: str
    password: str = field(repr=False)
    namespace: str | None = None
    version: int = 0

    def engine_auth(self) -> dict[str, str]:
        """The body of the Engine's X-Registry-Auth header and `/auth` call."""
        return {"username": self.username, "password": self.password, "serveraddress": self.server}

    def public(self) -> dict[str, object]:
        """What the API may show: everything but the secret."""
        return {
            "server": self.server,
            "username": self.username,
            "namespace": self.namespace,
            "version": self.version,
        }
