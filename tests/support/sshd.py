"""A real OpenSSH sshd of the test's own on a loopback port: its host key, its config,
its authorized_keys and a known_hosts for the client, all under a temporary folder."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.procs import free_port, port_open, stop, wait_until

SSHD = "/usr/sbin/sshd"
_CONFIG = """ListenAddress 127.0.0.1
HostKey {root}/host_ed25519
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
LogLevel VERBOSE
"""


def keygen(path: Path) -> str:
    """A new ed25519 key pair at `path`; its public key line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path.with_suffix(".pub").read_text().strip()


class Sshd:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="da-ssh-"))
        self.port = free_port()
        self.url = f"ssh://root@127.0.0.1:{self.port}"
        self.identity = self.root / "client_ed25519"
        self.known_hosts = self.root / "known_hosts"
        self.log_path = self.root / "sshd.log"
        self.config = self.root / "sshd_config"
        self.config.write_text(_CONFIG.format(root=self.root))
        host_key = keygen(self.root / "host_ed25519")
        (self.root / "authorized_keys").write_text(keygen(self.identity) + "\n")
        self.known_hosts.write_text(self.known_hosts_line(host_key))
        self.proc: subprocess.Popen[bytes] | None = None

    def known_hosts_line(self, public_key: str) -> str:
        kind, key = public_key.split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {key}\n"

    def impostor_known_hosts(self) -> Path:
        """A known_hosts that holds another key for this host and port."""
        path = self.root / "impostor_known_hosts"
        path.write_text(self.known_hosts_line(keygen(self.root / "impostor_ed25519")))
        return path

    def start(self) -> Sshd:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation wants it
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config), "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._listening, 20, f"sshd on {self.port}")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {self.log_path.read_text()[-2000:]}")
        return port_open(self.port)

    def stop(self) -> None:
        """Stop listening; connections made before go on (each has its own process)."""
        if self.proc is not None:
            stop(self.proc)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
