"""A real distribution registry (Debian's docker-registry) with an htpasswd login."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt

from tests.support.canary import CANARY
from tests.support.procs import free_port, port_open, stop, wait_until

_ACCESS_LINE = re.compile(r'"(?:GET|HEAD|POST|PUT|PATCH|DELETE) /v2')
_CONFIG = """version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root}/data
  delete:
    enabled: true
http:
  addr: {address}:{port}
  secret: test-only-secret
{tls}auth:
  htpasswd:
    realm: test-registry
    path: {root}/htpasswd
"""


class Registry:
    def __init__(
        self,
        username: str = "pusher",
        password: str = CANARY.registry_password,
        *,
        address: str = "127.0.0.1",
        tls: tuple[Path, Path] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        """`tls` is (certificate, key); `prefix` runs it elsewhere (a host's namespace)."""
        self.root = Path(tempfile.mkdtemp(prefix="da-reg-"))
        self.port = free_port()
        self.address = address
        self.host = f"{address}:{self.port}"
        self.prefix = prefix or []
        tls_block = f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n" if tls else ""
        self.username = username
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "registry.log"
        (self.root / "config.yml").write_text(
            _CONFIG.format(root=self.root, port=self.port, address=address, tls=tls_block)
        )
        self.set_password(password)

    def rotate_password(self, label: str) -> str:
        """Set a new password made of `label` and this run's canary marker (a literal of
        the sources would also be in any copy of them, and the scan would find it there);
        takes effect at the next start. Returns the new password."""
        self.set_password(f"{label}-{CANARY.marker}")
        return self.password

    def set_password(self, password: str) -> None:
        """Write the htpasswd file; takes effect at the next start. A rotated password
        is searched for by the canary scan as well."""
        self.password = password
        CANARY.issue(password)
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        (self.root / "htpasswd").write_text(f"{self.username}:{hashed}\n")

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, "docker-registry", "serve", str(self.root / "config.yml")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._listening, 20, f"registry on {self.host}")
        CANARY.sample_argv()

    def _listening(self) -> bool:
        if not self.prefix:
            return port_open(self.port)
        probe = subprocess.run(
            [*self.prefix, "bash", "-c", f"exec 3<>/dev/tcp/{self.address}/{self.port}"],
            capture_output=True,
            check=False,
            timeout=10,
        )
        return probe.returncode == 0

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash; `start` brings it back on the same data."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def request_count(self) -> int:
        """How many HTTP requests the registry has answered so far."""
        if not self.log_path.exists():
            return 0
        return len(_ACCESS_LINE.findall(self.log_path.read_text()))

    def _manifest_request(
        self, repository_path: str, reference: str, method: str = "GET"
    ) -> urllib.request.Request:
        return urllib.request.Request(
            f"http://{self.host}/v2/{repository_path}/manifests/{reference}",
            method=method,
            headers={
                "Authorization": "Basic "
                + base64.b64encode(f"{self.username}:{self.password}".encode()).decode(),
                "Accept": "application/vnd.docker.distribution.manifest.v2+json",
            },
        )

    def delete_manifest(self, repository_path: str, digest: str) -> None:
        """Delete a manifest by digest, as a registry's own cleanup would."""
        request = self._manifest_request(repository_path, digest, "DELETE")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 202, response.status

    def manifest_digest(self, repository_path: str, reference: str) -> str | None:
        """The digest the registry serves for `repository_path:reference`, or None."""
        request = self._manifest_request(repository_path, reference)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                json.load(response)
                return str(response.headers["Docker-Content-Digest"])
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def cleanup(self) -> None:
        self.stop()
        if self.log_path.exists():
            CANARY.keep(f"registry {self.host} log", self.log_path.read_text(errors="replace"))
        shutil.rmtree(self.root, ignore_errors=True)
