"""The leader's certificate authority, its server certificate, and join tokens that pin it.

A join token is `DAT1-<sha256 of the CA certificate, hex>-<secret>`, in the spirit of
Docker Swarm's SWMTKN: a worker trusts exactly the CA whose digest its token names.
Private keys are written 0600 and never leave the state directory.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
import secrets
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import AgentError
from agent.files import write_private
from agent.logs import get_logger

log = get_logger(__name__)
TOKEN_PREFIX = "DAT1"  # noqa: S105 (a format marker, not a secret)
# A join token: the prefix, the CA's sha256 in hex, and a secret as new_secret() makes
# them; blanks around it are allowed (the ASCII ones: JSON Schema's \s is not Python's).
_BLANKS = " \t\r\n"
JOIN_TOKEN_PATTERN = rf"^[ \t\r\n]*{TOKEN_PREFIX}-[0-9A-Fa-f]{{64}}-[A-Za-z0-9_-]+[ \t\r\n]*$"
CA_DAYS = 3650
SERVER_DAYS = 825
RENEW_BEFORE = datetime.timedelta(days=30)
# Certificates start an hour in the past: a node whose clock lags the leader's (a new VM
# before NTP has run) still accepts one just made.
BACKDATE = datetime.timedelta(hours=1)
SERVER_NAME = "deploy-agent leader"  # the certificate's names are in its SAN


class JoinTokenError(AgentError):
    """A join token that is not of the form DAT1-<fingerprint>-<secret>."""


@dataclass(frozen=True, slots=True)
class LeaderTLS:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def fingerprint(self) -> str:
        return ca_fingerprint(self.ca_file.read_bytes())

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def pinned_context(*, cafile: str | None = None, cadata: str | None = None) -> ssl.SSLContext:
    """A client context that trusts the CA given, and only it.

    Python 3.13 turns on OpenSSL's strict X.509 checks in its default contexts, and
    those require key identifiers that a CA made by an earlier leader does not carry. It
    cannot be given them without changing its fingerprint, which enrolled nodes pin; the
    pin is what this context trusts, so the strict checks are left off.
    """
    context = ssl.create_default_context(cafile=cafile, cadata=cadata)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    return context


def ca_fingerprint(ca_pem: bytes) -> str:
    """The SHA-256 of the CA certificate's DER bytes, in hex."""
    cert = x509.load_pem_x509_certificate(ca_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def ensure_leader_tls(directory: Path, names: list[str], *, create_ca: bool = True) -> LeaderTLS:
    """Load the CA and server certificate from `directory`, creating them on first start
    (the CA only if `create_ca`: a running leader never makes a new one, which would
    break every node's pin).

    A server certificate that no longer does (it does not load, its names do not cover
    `names`, it expires within 30 days, another CA issued it, it lacks the key
    identifiers strict clients require) is issued again from the same CA, so join tokens
    stay valid. A CA whose key is not its own is refused: nothing could be signed.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    tls = LeaderTLS(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca_key_file = directory / "ca.key"
    if not tls.ca_file.exists() and not create_ca:
        raise FileNotFoundError(f"{tls.ca_file} is gone: restore it, then restart the leader")
    if not tls.ca_file.exists():
        _write_ca(tls.ca_file, ca_key_file)
        log.info(
            "tls.ca_created",
            ca_file=str(tls.ca_file),
            fingerprint=tls.fingerprint(),
            note="join tokens pin this CA: nodes enrolled with another must enrol again",
        )
    reason = _reissue_reason(tls, names)
    if reason is not None:
        _check_ca_pair(tls.ca_file, ca_key_file)
        cert = _write_server(tls, ca_key_file, names)
        log.info(
            "tls.server_certificate_issued",
            reason=reason,
            names=names,
            expires=cert.not_valid_after_utc.isoformat(),
        )
    return tls


def default_names(extra: list[str]) -> list[str]:
    hostname = socket.gethostname()
    return list(dict.fromkeys([*extra, hostname, "localhost", "127.0.0.1", "::1"]))


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(path, data)


def _write_ca(ca_file: Path, key_file: Path) -> None:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deploy-agent leader CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_file, key)
    write_private(ca_file, cert.public_bytes(serialization.Encoding.PEM))


def _check_ca_pair(ca_file: Path, ca_key_file: Path) -> None:
    if not ca_key_file.exists():
        raise ValueError(
            f"{ca_key_file} is missing: restore it beside {ca_file}, or remove both for a "
            "new CA, with which every node must enrol again"
        )
    ca_cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
    if not _holds_key_of(ca_cert, ca_key_file):
        raise ValueError(
            f"{ca_key_file} is not the key of {ca_file} (was one restored without the "
            "other?): restore the pair, or remove both for a new CA, with which every "
            "node must enrol again"
        )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([_general_name(name) for name in names])


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    try:
        return x509.DNSName(name)
    except ValueError as exc:
        raise ValueError(f"leader.tls_names: {name!r} cannot name a certificate ({exc})") from None


def _reissue_reason(tls: LeaderTLS, names: list[str]) -> str | None:
    """Why the server certificate must be issued again, or None if it serves as it is."""
    if not tls.cert_file.exists():
        return "none yet"
    try:
        cert = x509.load_pem_x509_certificate(tls.cert_file.read_bytes())
    except ValueError:
        return "damaged"  # empty or torn: written in place by an earlier version
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    checks: tuple[tuple[str, Callable[[], bool]], ...] = (
        ("key", lambda: _holds_key_of(cert, tls.key_file)),  # a crash between the two writes
        ("names", lambda: _names_cover(cert, names)),
        ("expiry", lambda: left > RENEW_BEFORE),
        ("another CA", lambda: _issued_by(cert, tls.ca_file)),
        ("key identifiers", lambda: _has_authority_key_id(cert)),
    )
    return next((reason for reason, holds in checks if not holds()), None)


def _names_cover(cert: x509.Certificate, names: list[str]) -> bool:
    have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(_san(names)) <= set(have)


def _issued_by(cert: x509.Certificate, ca_file: Path) -> bool:
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_file.read_bytes()))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _has_authority_key_id(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    except x509.ExtensionNotFound:
        return False
    return True


def _holds_key_of(cert: x509.Certificate, key_file: Path) -> bool:
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError):
        return False
    return key.public_key() == cert.public_key()


def _write_server(tls: LeaderTLS, ca_key_file: Path, names: list[str]) -> x509.Certificate:
    ca_cert = x509.load_pem_x509_certificate(tls.ca_file.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(tls.key_file, key)
    write_private(tls.cert_file, cert.public_bytes(serialization.Encoding.PEM))
    return cert


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    # a secret from a request header may hold stray bytes (decoded with surrogateescape):
    # it hashes like any other, and matches nothing
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def make_join_token(fingerprint: str, secret: str) -> str:
    return f"{TOKEN_PREFIX}-{fingerprint}-{secret}"


def parse_join_token(token: str) -> tuple[str, str]:
    """Split a join token into (CA fingerprint, secret). Its shape is JOIN_TOKEN_PATTERN,
    which the API's document states: blanks around it (a copied line) do not count."""
    if re.fullmatch(JOIN_TOKEN_PATTERN, token) is None:
        raise JoinTokenError(
            "the join token is malformed: expected DAT1-<64 hex digits>-<secret>; "
            "get a new one with `deploy-agent join-token` on the leader"
        )
    _, fingerprint, secret = token.strip(_BLANKS).split("-", 2)
    return fingerprint.lower(), secret
