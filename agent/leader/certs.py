"""The certificate the leader serves, kept current while it runs.

A leader may run longer than its server certificate lives, and operators replace
certificates they manage (`[leader.tls]`) in place. Every hour the leader issues its own
certificate again when it is due (as at start), and loads a certificate whose files
changed into a new server context. The listening socket keeps its first context; each
handshake is switched to the newest one as it begins (the TLS server-name callback, which
OpenSSL calls for every handshake), so a change needs no restart and drops no link.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import Callable
from typing import Any

from cryptography import x509

from agent.logs import get_logger
from agent.tls import LeaderTLS

log = get_logger(__name__)
CHECK_INTERVAL_S = 3600.0


class ServingCertificate:
    """The leader's server contexts: `listening` for the socket, `current` for each
    handshake. `renew`, for the leader's own CA, issues the certificate again if due."""

    def __init__(self, tls: LeaderTLS, renew: Callable[[], object] | None = None) -> None:
        self._tls = tls
        self._renew = renew
        self._loaded = self._files()
        self.current = tls.server_context()
        self.listening = self.current
        self.listening.sni_callback = self._switch

    def _switch(self, conn: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        current = self.current
        if conn.context is not current:
            conn.context = current

    def _files(self) -> tuple[bytes, bytes]:
        return self._tls.cert_file.read_bytes(), self._tls.key_file.read_bytes()

    def refresh(self) -> bool:
        """Renew if due, and serve the certificate's files if they changed since they were
        loaded; True if a new certificate is now served. Blocking: run it on a thread."""
        if self._renew is not None:
            self._renew()
        files = self._files()
        if files == self._loaded:
            return False
        self.current = self._tls.server_context()  # loads and checks the pair first
        self._loaded = files
        return True

    def expires(self) -> str:
        cert = x509.load_pem_x509_certificate(self._loaded[0])
        return cert.not_valid_after_utc.astimezone(datetime.UTC).isoformat()

    async def keep_current(self, interval: float = CHECK_INTERVAL_S) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                if await asyncio.to_thread(self.refresh):
                    log.info("tls.certificate_reloaded", expires=self.expires())
            except Exception as exc:  # a replacement half written, a CA gone: try next hour
                log.warning(
                    "tls.certificate_reload_failed",
                    error=f"{type(exc).__name__}: {exc}",
                    note="the certificate loaded before is still served",
                )
