"""The leader's own CA and server certificate: what clients, strict ones included, accept,
and when the certificate is issued again (the CA, which join tokens pin, never is)."""

from __future__ import annotations

import asyncio
import datetime
import functools
import ssl
from collections.abc import Callable
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import tls as tls_module
from agent.config import parse_config
from agent.errors import ConfigError
from agent.leader.certs import ServingCertificate
from agent.leader.server import _leader_tls
from agent.tls import LeaderTLS, ensure_leader_tls, pinned_context

NAMES = ["leader.test", "127.0.0.1"]


async def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> x509.Certificate:
    """A TLS handshake over loopback, the client checking the name 127.0.0.1 (and
    sending no server name: it is an address); the certificate the server presented."""
    served = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=server)
    port = served.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="127.0.0.1"
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
    finally:
        served.close()
        await served.wait_closed()
    return x509.load_der_x509_certificate(der)


def _strict(ca_file: Path) -> ssl.SSLContext:
    """A client context as Python 3.13 makes by default: strict X.509 checks."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def _legacy_tls(directory: Path) -> LeaderTLS:
    """A CA and server certificate as leaders made them before they carried key
    identifiers (nodes enrolled with such a leader pin that CA)."""
    directory.mkdir()
    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str,
        issuer: str,
        key: ec.EllipticCurvePrivateKey,
        signer: ec.EllipticCurvePrivateKey,
        ca: bool,
    ) -> bytes:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=400))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True)
        )
        if not ca:
            san = [x509.DNSName("leader.test"), x509.IPAddress(ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), False)
        return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    tls = LeaderTLS(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    tls.ca_file.write_bytes(certificate("CA", "CA", ca_key, ca_key, ca=True))
    (directory / "ca.key").write_bytes(pem(ca_key))
    tls.cert_file.write_bytes(certificate("leader.test", "CA", key, ca_key, ca=False))
    tls.key_file.write_bytes(pem(key))
    return tls


async def test_the_leader_certificate_passes_strict_x509_checks(tmp_path: Path) -> None:
    """Python 3.13's default client context checks certificates strictly (key
    identifiers on the CA and the server certificate): a node or CLI there must accept a
    new leader's certificate."""
    tls = ensure_leader_tls(tmp_path, NAMES)
    await _handshake(tls.server_context(), _strict(tls.ca_file))


async def test_a_ca_made_without_key_identifiers_is_still_trusted_where_it_is_pinned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An earlier leader's CA fails strict checks and cannot be mended without a new
    fingerprint: the contexts that pin it (nodes, the CLI) leave the strict checks off,
    even where Python turns them on by default."""
    tls = _legacy_tls(tmp_path / "tls")
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(tls.server_context(), _strict(tls.ca_file))

    default_context: Callable[..., ssl.SSLContext] = ssl.create_default_context

    def strict_by_default(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        context = default_context(*args, **kwargs)
        context.verify_flags |= ssl.VERIFY_X509_STRICT
        return context

    monkeypatch.setattr(ssl, "create_default_context", strict_by_default)
    await _handshake(tls.server_context(), pinned_context(cafile=str(tls.ca_file)))
    await _handshake(tls.server_context(), pinned_context(cadata=tls.ca_file.read_text()))


def test_an_old_server_certificate_is_issued_again_under_the_same_ca(tmp_path: Path) -> None:
    """At start, a server certificate without key identifiers is replaced; the CA, and
    with it every join token and enrolled node's pin, stays."""
    legacy = _legacy_tls(tmp_path / "tls")
    fingerprint = legacy.fingerprint()
    old = legacy.cert_file.read_bytes()

    tls = ensure_leader_tls(tmp_path / "tls", NAMES)

    assert tls.fingerprint() == fingerprint
    assert tls.cert_file.read_bytes() != old
    cert = x509.load_pem_x509_certificate(tls.cert_file.read_bytes())
    cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    tls.server_context()


async def test_a_certificate_another_ca_issued_is_issued_again(tmp_path: Path) -> None:
    """The CA files were replaced (restored from a backup on their own, say): the
    certificate the leader serves must come from the CA it hands to joining nodes."""
    ensure_leader_tls(tmp_path, NAMES)
    (tmp_path / "ca.pem").unlink()
    (tmp_path / "ca.key").unlink()

    tls = ensure_leader_tls(tmp_path, NAMES)

    await _handshake(tls.server_context(), pinned_context(cafile=str(tls.ca_file)))


def test_a_torn_key_pair_is_issued_again(tmp_path: Path) -> None:
    """A crash between writing the server key and its certificate leaves a pair that
    does not match: the next start issues a new one instead of failing to load it."""
    tls = ensure_leader_tls(tmp_path, NAMES)
    other = ec.generate_private_key(ec.SECP256R1())
    tls.key_file.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ssl.SSLError):
        tls.server_context()

    ensure_leader_tls(tmp_path, NAMES).server_context()


def test_a_certificate_near_its_end_is_issued_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls_module, "SERVER_DAYS", 20)  # within the 30 days of renewal
    first = ensure_leader_tls(tmp_path, NAMES).cert_file.read_bytes()
    monkeypatch.setattr(tls_module, "SERVER_DAYS", 825)
    again = ensure_leader_tls(tmp_path, NAMES).cert_file.read_bytes()
    assert again != first
    assert ensure_leader_tls(tmp_path, NAMES).cert_file.read_bytes() == again  # then kept


async def test_a_long_name_first_in_the_list_makes_a_certificate(tmp_path: Path) -> None:
    """A DNS name may be 253 characters long; a certificate's common name only 64, so
    the names go in the certificate's SAN alone."""
    long_name = ".".join(["a" * 40, "b" * 40, "example.com"])
    tls = ensure_leader_tls(tmp_path, [long_name, "127.0.0.1"])
    await _handshake(tls.server_context(), _strict(tls.ca_file))


def test_a_name_no_certificate_can_hold_is_a_config_error(tmp_path: Path) -> None:
    """Not a traceback and a restart every 5 s: exit 2, naming the key."""
    config = parse_config(
        {
            "role": "leader",
            "state_dir": str(tmp_path),
            "leader": {"api_token": "t" * 32, "tls_names": ["bücher.test"]},
        }
    )
    assert config.leader is not None
    with pytest.raises(ConfigError, match=r"leader\.tls_names"):
        _leader_tls(config.leader, tmp_path)


async def test_a_certificate_due_for_renewal_is_served_anew_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader may run past its certificate's renewal date: the hourly check issues a
    new one from the same CA and the listening socket serves it from the next handshake."""
    monkeypatch.setattr(tls_module, "SERVER_DAYS", 20)  # due: within the 30 days of renewal
    tls = ensure_leader_tls(tmp_path, NAMES)
    monkeypatch.setattr(tls_module, "SERVER_DAYS", 825)
    serving = ServingCertificate(tls, functools.partial(ensure_leader_tls, tmp_path, NAMES))
    client = pinned_context(cafile=str(tls.ca_file))
    before = await _handshake(serving.listening, client)

    assert serving.refresh()

    after = await _handshake(serving.listening, client)
    assert after.serial_number != before.serial_number
    left = after.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert left > datetime.timedelta(days=800)
    assert not serving.refresh()  # not due again: nothing changes


async def test_certificate_files_replaced_in_place_are_served_and_a_broken_pair_is_not(
    tmp_path: Path,
) -> None:
    """An operator's certificate ([leader.tls]) replaced on disk is served from the next
    handshake; a replacement caught half written (a new certificate, the old key) is
    refused and the one loaded before is served on."""
    tls = ensure_leader_tls(tmp_path / "given", NAMES)
    serving = ServingCertificate(tls)
    client = pinned_context(cafile=str(tls.ca_file))
    first = await _handshake(serving.listening, client)
    (tmp_path / "given" / "server.pem").unlink()  # the operator's new pair, same CA
    renewed = ensure_leader_tls(tmp_path / "given", NAMES)

    assert serving.refresh()
    second = await _handshake(serving.listening, client)
    assert second.serial_number != first.serial_number

    old_key = renewed.key_file.read_bytes()
    (tmp_path / "given" / "server.pem").unlink()
    ensure_leader_tls(tmp_path / "given", NAMES)
    renewed.key_file.write_bytes(old_key)  # the key not replaced yet
    with pytest.raises(ssl.SSLError):
        serving.refresh()
    assert (await _handshake(serving.listening, client)).serial_number == second.serial_number


def test_a_ca_restored_without_its_key_is_refused_not_reissued_against(tmp_path: Path) -> None:
    """ca.pem replaced on its own: the old key cannot sign for it, so every certificate
    issued would fail against the CA handed to joining nodes (and, checked hourly, be
    issued again every hour). The leader says which pair is broken instead."""
    ensure_leader_tls(tmp_path / "other", NAMES)
    ensure_leader_tls(tmp_path / "tls", NAMES)
    (tmp_path / "tls" / "ca.pem").write_bytes((tmp_path / "other" / "ca.pem").read_bytes())

    with pytest.raises(ValueError, match=r"ca\.key is not the key of .*ca\.pem"):
        ensure_leader_tls(tmp_path / "tls", NAMES)
    config = parse_config(
        {"role": "leader", "state_dir": str(tmp_path), "leader": {"api_token": "t" * 32}}
    )
    assert config.leader is not None
    with pytest.raises(ConfigError, match="is not the key of"):
        _leader_tls(config.leader, tmp_path)


def test_a_damaged_server_certificate_is_issued_again(tmp_path: Path) -> None:
    """An empty server.pem (written in place, before writes were atomic, by a leader
    that crashed) is replaced at the next start, not a config error for good."""
    tls = ensure_leader_tls(tmp_path, NAMES)
    tls.cert_file.write_bytes(b"")
    ensure_leader_tls(tmp_path, NAMES).server_context()


def test_the_hourly_renewal_never_makes_a_new_ca(tmp_path: Path) -> None:
    """A new CA would break every node's pin while the leader runs: with ca.pem gone,
    renewal fails (and is logged), and no CA is made."""
    tls = ensure_leader_tls(tmp_path, NAMES)
    renew = functools.partial(ensure_leader_tls, tmp_path, NAMES, create_ca=False)
    serving = ServingCertificate(tls, renew)
    tls.ca_file.unlink()
    with pytest.raises(FileNotFoundError):
        serving.refresh()
    assert not tls.ca_file.exists()
