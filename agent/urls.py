"""URLs as they may be shown: in logs, API responses and error messages."""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """The URL with what may be a credential masked: its user name and password (a
    token is often given as the user, `https://TOKEN@host/…`) and its query string
    (`?access_token=…`)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # "http://[oops": nothing of it can be told safe to show
        return "(an unreadable URL)"
    if parts.username is not None or parts.password is not None:
        parts = parts._replace(netloc=f"***@{host_of(parts)}")
    if parts.query:
        parts = parts._replace(query="***")
    return urlunsplit(parts)


# Where a URL's user name may be a token (`https://TOKEN@host/…`). Elsewhere (ssh, git)
# a bare user name is the login a key authenticates, `ssh://git@host/…`: no secret.
_TOKEN_AS_USER = frozenset({"http", "https"})


def without_userinfo(url: str) -> str:
    """The URL without its credentials: a password, or a user name that may be a token."""
    parts = urlsplit(url)
    user_is_secret = parts.username is not None and parts.scheme in _TOKEN_AS_USER
    if parts.password is None and not user_is_secret:
        return url
    return urlunsplit(parts._replace(netloc=host_of(parts)))


def host_of(parts: SplitResult) -> str:
    """The URL's host and port, as written (an IPv6 address keeps its brackets)."""
    return parts.netloc.rpartition("@")[2]
