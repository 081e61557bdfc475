"""Image references and registry hosts: parse, validate, compare.

Follows the distribution reference grammar closely enough to refuse what an engine
would refuse, and knows Docker Hub's several names.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from agent.credentials import RegistryCredentials
from agent.errors import RequestError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_HOST = rf"{_LABEL}(?:\.{_LABEL})*"
_REPOSITORY = re.compile(rf"^(?:{_HOST}(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*$")
DOCKER_HUB = "docker.io"
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
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
    require_registry_host(image, creds)
    return push_name(image)


def require_registry_host(
    repository: str, creds: RegistryCredentials, field: str = "image"
) -> None:
    """Refuse a repository outside the configured registry, with what to do instead."""
    wanted, have = image_host(repository), registry_host(creds.server)
    if wanted != have:
        raise RequestError(
            400,
            "invalid_request",
            f"{field} {repository} is on {wanted}, but the configured registry is {have}",
            hint=f"name the image {have}/…, or change the registry with PUT /v1/registry; "
            "an image outside the registry is the classic 'image not found' on the nodes",
        )


class ImageReference(NamedTuple):
    """A parsed `REPOSITORY[:TAG][@DIGEST]`."""

    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        if self.digest is not None:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag or 'latest'}"


def parse_reference(ref: str, field: str = "prebuilt") -> ImageReference:
    """Split an image reference into its parts; a RequestError names what is wrong."""
    name, _, digest = ref.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = name[colon + 1 :] if colon > slash else None
    repository = name[:colon] if tag is not None else name
    if (digest and not _DIGEST.match(digest)) or (tag is not None and not _TAG.match(tag)):
        raise RequestError(
            400,
            "invalid_request",
            f"{field} {ref[:300]!r} is not a valid image reference",
            hint="use HOST[:PORT]/NAMESPACE/NAME:TAG or …@sha256:DIGEST",
        )
    try:
        validate_repository(repository)
    except RequestError as exc:
        raise RequestError(
            400, "invalid_request", f"{field}: {exc.message}", hint=exc.hint
        ) from None
    return ImageReference(repository, tag, digest or None)
