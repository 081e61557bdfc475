"""The agent's exception hierarchy: every error a user can see carries a message to act on.

    AgentError
    ├── ConfigError               a config key is missing or wrong (names the key)
    ├── RequestError              bad API input: HTTP status, error code, message
    ├── EngineError               the Docker Engine failed or is unreachable
    │   ├── EngineApiError        an API call answered with an error status
    │   ├── BuildError            the build failed (with the log's last lines)
    │   └── RegistryError         the engine talked to a registry and it said no
    │       ├── RegistryAuthError     credentials rejected (never retried)
    │       └── RegistryTransientError  connection, timeout, 5xx, 429, cut stream (retried)
    ├── DeploymentError           a deployment failed: SPEC error code, message, hint
    ├── SshError                  an SSH connection, command or file transfer failed
    │   └── SshRefused                the host or this login was refused: never retried
    │       └── HostKeyRejected           the host's key is not the one known_hosts holds
    └── BootstrapError            a bootstrap step failed: which step, and why

Nothing here may hold a secret: messages end up in logs and API responses.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(AgentError):
    """The configuration is invalid; the message names the key."""


class RequestError(AgentError):
    """An API request was refused; nothing changed."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        hint: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.hint = hint
        self.headers = headers or {}


class EngineError(AgentError):
    """The Docker Engine could not do what was asked."""


class EngineApiError(EngineError):
    """The engine answered an API call with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BuildError(EngineError):
    """The image build failed; `log_tail` holds the last lines of its log."""

    def __init__(self, message: str, log_tail: list[str]) -> None:
        super().__init__(message)
        self.log_tail = log_tail


class RegistryError(EngineError):
    """A registry refused or failed an operation for good."""


class RegistryAuthError(RegistryError):
    """The registry rejected the credentials or denied access."""


class RegistryTransientError(RegistryError):
    """A failure worth retrying: connection, timeout, 5xx, 429, a stream cut short."""

    def __init__(self, message: str, *, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class DeploymentError(AgentError):
    """A deployment failed with one of the SPEC error codes."""

    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint


class SshError(AgentError):
    """The SSH connection, a remote command or a file transfer failed."""


class SshRefused(SshError):
    """The connection was refused for what it is, not for a fault that passes: the host's
    key, the user or the key it logs in with. Trying again fails the same way."""


class HostKeyRejected(SshRefused):
    """The host's key is missing from known_hosts or differs from it: never connected."""


class BootstrapError(AgentError):
    """A bootstrap step failed; `step` names it, the message says why."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step
