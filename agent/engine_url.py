"""The Docker Engine's address, read as the docker CLI reads DOCKER_HOST."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from agent.errors import ConfigError

SCHEMES = ("unix", "tcp", "http", "https", "ssh")
PLAIN_PORT, TLS_PORT = 2375, 2376  # Docker's own ports for the engine over TCP
SHAPES = "unix:///PATH/docker.sock, tcp://HOST:PORT, https://HOST:PORT or ssh://USER@HOST"


def normalized(given: str) -> str:
    """`given` as the engine client takes it: `HOST:PORT` is TCP, and a TCP address
    without a port has Docker's (2376 when DOCKER_TLS_VERIFY=1, else 2375). A
    ConfigError naming `engine.url` for anything the client could not use."""
    text = given.strip()
    if "://" not in text:
        text = f"tcp://{text}"
    scheme, _, rest = text.partition("://")
    if scheme not in SCHEMES or not rest.strip("/"):
        what = f"no {scheme}:// address" if scheme in SCHEMES else f"scheme {scheme!r}"
        raise ConfigError(
            f"engine.url (or DOCKER_HOST): not an engine address ({what}): give {SHAPES}"
        )
    if scheme not in ("tcp", "http", "https"):
        return text
    tls = scheme == "https" or os.environ.get("DOCKER_TLS_VERIFY", "0") == "1"
    if tls and scheme == "tcp" and not os.environ.get("DOCKER_CERT_PATH"):
        raise ConfigError(
            "engine.url (or DOCKER_HOST): DOCKER_TLS_VERIFY=1 needs DOCKER_CERT_PATH, "
            "the directory of ca.pem, cert.pem and key.pem"
        )
    try:
        port = urlsplit(text).port
    except ValueError:
        raise ConfigError("engine.url (or DOCKER_HOST): its port is not a number") from None
    if port is None:
        head, slash, tail = rest.partition("/")
        text = f"{scheme}://{head}:{TLS_PORT if tls else PLAIN_PORT}{slash}{tail}"
    return text
