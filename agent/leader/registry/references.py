"""Image references and registry hosts: parse, validate, compare.

Follows the distribution reference grammar closely enough to refuse what an engine
would refuse, and knows Docker Hub's several names.
"""

from __future__ import annotations

import re

from agent.credentials import RegistryCredentials
from agent.errors import RequestError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_HOST = rf"{_LABEL}(?:\.{_LABEL})*"
_REPOSITORY = re.compile(rf"^(?:{_HOST}(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*$")
DOCKER_HUB = "docker.io"
_HUB_ALIASES = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)


def registry_host(server: str) -> str:
    """The image host a login address stands for (`https://index.docker.io/v1/` → docker.io)."""
    host = server.strip().removeprefix("https://").removeprefix("http://")
    host = host.split("/", 1)[0].lower()
    return DOCKER_HUB if host in _HUB_ALIASES else host


def image_host(repository: str) -> str:
    """The registry host of a repository name, Docker Hub when it names none."""
    first, sep, _ = repository.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return registry_host(first)
    return DOCKER_HUB


def validate_repository(repository: str) -> str:
    if len(repository) > 255 or not _REPOSITORY.match(repository):
        raise RequestError(
            400,
            "invalid_request",
            f"image {repository!r} is not a valid repository name",
            hint="use HOST[:PORT]/NAMESPACE/NAME in lower case, without a tag or digest",
        )
    return repository


def push_name(repository: str) -> str:
    """The name the engine pushes: Docker Hub repositories need their host spelled out,
    as docker.io (the engine knows Hub by that name only)."""
    if image_host(repository) != DOCKER_HUB:
        return repository
    first, _, rest = repository.partition("/")
    if first.lower() in _HUB_ALIASES:  # index.docker.io/acme/web → docker.io/acme/web
        return f"{DOCKER_HUB}/{rest}"
    return f"{DOCKER_HUB}/{repository}"


def repository_for(app: str, image: str | None, creds: RegistryCredentials) -> str:
    """The repository a registry-mode deployment pushes to."""
    if image is None:
        namespace = creds.namespace or creds.username.lower()
        return validate_repository(f"{registry_host(creds.server)}/{namespace}/{app}")
    validate_repository(image)
    wanted, have = image_host(image), registry_host(creds.server)
    if wanted != have:
        raise RequestError(
            400,
            "invalid_request",
            f"image {image} is on {wanted}, but the configured registry is {have}",
            hint=f"name the image {have}/…, or change the registry with PUT /v1/registry; "
            "an image outside the registry is the classic 'image not found' on the nodes",
        )
    return push_name(image)
