"""A worker's identity: enrolment with a join token that pins the leader's CA, and the
node secret kept 0600 in the state directory.

The CA is fetched once over an unverified connection and trusted only if its SHA-256
matches the token's pin; every later connection verifies against it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from pathlib import Path

import aiohttp
import msgspec

from agent.errors import AgentError, ConfigError
from agent.files import write_private
from agent.logs import get_logger
from agent.tls import (
    JoinTokenError,
    ca_fingerprint,
    new_secret,
    parse_join_token,
    pinned_context,
)

log = get_logger(__name__)
CALL_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=10)
IDENTITY_FILE = "node.json"
PROPOSAL_FILE = "join-secret.json"  # until the leader has answered the join


# The leader's answers that no retry changes: a malformed request, a token it does not
# take, a name already enrolled. A 408 or 429 (a proxy's, say) is worth another try.
REFUSALS = frozenset({400, 401, 403, 409})


class EnrolmentError(AgentError):
    """The worker could not join: the leader could not be reached or did not answer as
    one; a restart may find it."""


class EnrolmentRefused(EnrolmentError, ConfigError):
    """Enrolment cannot succeed as configured: the join token is malformed, pins
    another CA, or the leader refused it (or the node's name). A restart would meet the
    same refusal (exit 2: the unit is not restarted) until the config changes."""


class Identity(msgspec.Struct, frozen=True):
    node_id: str
    secret: str
    leader_url: str
    ca_pem: str | None

    def ssl_for(self, url: str) -> ssl.SSLContext | bool:
        """How to verify the leader at `url`, whose config may have moved it since the
        node enrolled: against the CA pinned at enrolment; against the system's trusted
        CAs for an https leader enrolled with over plain HTTP (nothing pinned, yet the
        node secret must not go to whoever answers); not at all for a plain-HTTP leader,
        unless the node enrolled with a TLS one, which would send the secret in clear."""
        if not url.startswith("https://"):
            if self.ca_pem is not None:
                raise ConfigError(
                    f"worker.leader_url: {url} is plain HTTP, but this node enrolled with "
                    "a TLS leader (its CA is pinned); the node secret would cross the "
                    "network in clear: use the leader's https:// URL"
                )
            return False
        if self.ca_pem is not None:
            return pinned_context(cadata=self.ca_pem)
        context = ssl.create_default_context()  # the system's CAs
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Node {self.node_id}:{self.secret}"}


def load_identity(state_dir: Path) -> Identity | None:
    path = state_dir / IDENTITY_FILE
    if not path.exists():
        return None
    try:
        return msgspec.json.decode(path.read_bytes(), type=Identity)
    except msgspec.DecodeError as exc:  # restarting cannot mend it: a config error (exit 2)
        raise ConfigError(
            f"{path} does not hold this node's identity ({exc}): remove it and enrol the "
            "node again with a join token"
        ) from None


class _Proposal(msgspec.Struct, frozen=True):
    secret: str


def save_identity(state_dir: Path, identity: Identity) -> None:
    write_private(state_dir / IDENTITY_FILE, msgspec.json.encode(identity))
    (state_dir / PROPOSAL_FILE).unlink(missing_ok=True)


def proposed_secret(state_dir: Path) -> str:
    """The secret this node proposes when it joins: made once and kept until the node is
    enrolled, so a join whose answer was lost can be repeated and gets the same node."""
    path = state_dir / PROPOSAL_FILE
    if path.exists():
        return msgspec.json.decode(path.read_bytes(), type=_Proposal).secret
    secret = new_secret()
    write_private(path, msgspec.json.encode(_Proposal(secret)))
    return secret


async def enrol(leader_url: str, token: str, name: str | None, secret: str) -> Identity:
    """Join the leader at `leader_url` with `token`, proposing `secret` as the node's;
    return the identity to keep."""
    url = leader_url.rstrip("/")
    try:
        pinned, _ = parse_join_token(token)
    except JoinTokenError as exc:
        raise EnrolmentRefused(f"worker.join_token: {exc.message}") from None
    try:
        ca_pem = await _fetch_pinned_ca(url, pinned) if url.startswith("https://") else None
        if ca_pem is None:
            log.warning("enrol.plain_http", leader=url)
        identity = Identity(node_id="", secret="", leader_url=url, ca_pem=ca_pem)
        body = {"token": token, "name": name or socket.gethostname(), "secret": secret}
        async with (
            aiohttp.ClientSession(timeout=CALL_TIMEOUT) as session,
            session.post(f"{url}/v1/join", json=body, ssl=identity.ssl_for(url)) as response,
        ):
            joined = await _joined(url, response)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise EnrolmentError(
            f"could not enrol with the leader at {url}: {type(exc).__name__}: {exc}"
        ) from None
    log.info("enrol.done", node_id=joined.node_id)
    return Identity(node_id=joined.node_id, secret=joined.secret, leader_url=url, ca_pem=ca_pem)


class _Joined(msgspec.Struct):
    node_id: str
    secret: str


async def _joined(url: str, response: aiohttp.ClientResponse) -> _Joined:
    """The identity the leader's answer to a join gives, or an EnrolmentError that says
    why there is none: the leader's refusal and its hint, or an answer that is no
    leader's (a proxy's error page, a wrong URL)."""
    try:
        doc = await response.json(content_type=None)
    except ValueError:
        doc = None
    status = f"{response.status} {response.reason or ''}".strip()
    if response.status != 201 and isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        error = doc["error"]
        hint = f" ({error['hint']})" if error.get("hint") else ""
        message = f"the leader refused to enrol this node: {error.get('message')}{hint}"
        if response.status in REFUSALS:  # the token or the name: the config must change
            raise EnrolmentRefused(message)
        raise EnrolmentError(message)
    if response.status == 201:
        with contextlib.suppress(msgspec.ValidationError):
            return msgspec.convert(doc, _Joined)
    raise EnrolmentError(
        f"{url}/v1/join answered {status} with no node identity in it: is "
        "worker.leader_url the leader's address?"
    )


async def _fetch_pinned_ca(url: str, pinned: str) -> str:
    async with (
        aiohttp.ClientSession(timeout=CALL_TIMEOUT) as session,
        session.get(f"{url}/v1/ca.pem", ssl=False) as response,
    ):
        if response.status != 200:
            raise EnrolmentError(f"the leader did not serve its CA ({response.status})")
        ca_pem = await response.text()
    try:
        actual = ca_fingerprint(ca_pem.encode())
    except ValueError:
        raise EnrolmentError("the leader served something that is not a certificate") from None
    if actual != pinned:
        raise EnrolmentRefused(
            "the leader's CA does not match the join token's pin: refusing to trust it "
            f"(token pins {pinned[:16]}…, leader has {actual[:16]}…)"
        )
    return ca_pem
