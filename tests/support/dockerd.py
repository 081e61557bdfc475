"""A real Docker Engine of the test's own, beside any other engine on the machine."""

from __future__ import annotations

import fcntl
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import IO

from tests.support.canary import CANARY
from tests.support.procs import free_port, stop, wait_until

SWARM_LOCK = Path("/tmp/deploy-agent-tests-swarm.lock")


class Dockerd:
    def __init__(self, prefix: list[str] | None = None, *, bridge: bool = False) -> None:
        self.prefix = prefix or []  # e.g. nsenter into a simulated host's namespace
        # An engine as installed has its default bridge network, which builds' RUN steps
        # use. The tests' engines have none (--bridge=none: no bridge and no firewall
        # rules of theirs on the host) unless asked: then a bridge of the engine's own,
        # on a private subnet, with no NAT and no firewall rules either.
        self.bridge = Bridge() if bridge else None
        # exec-root and socket paths have a length limit: keep them short under /tmp
        self.root = Path(tempfile.mkdtemp(prefix="da-e", dir="/tmp"))
        self.sock = self.root / "d.sock"
        self.url = f"unix://{self.sock}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "dockerd.log"
        self._swarm_lock: IO[str] | None = None

    def start(self) -> None:
        if self.bridge is not None:
            self.bridge.create()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    "dockerd",
                    "--data-root",
                    str(self.root / "data"),
                    "--exec-root",
                    str(self.root / "x"),
                    "--pidfile",
                    str(self.root / "pid"),
                    "-H",
                    self.url,
                    f"--bridge={self.bridge.name if self.bridge else 'none'}",
                    "--iptables=false",
                    "--ip-masq=false",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._answers, 60, f"dockerd at {self.sock}")

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"dockerd exited: {self.log_path.read_text()[-2000:]}")
        return self.cli("version", check=False).returncode == 0

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "-H", self.url, *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def init_swarm(self, address: str = "127.0.0.1") -> None:
        """Make this engine a single-node Swarm manager (on a free port for loopback).

        A loopback Swarm owns the host's docker_gwbridge: one test run at a time may hold
        one, so a second run on the machine (another checkout's) waits for the first."""
        if not self.prefix:
            self._swarm_lock = SWARM_LOCK.open("a")
            fcntl.flock(self._swarm_lock, fcntl.LOCK_EX)
        port = free_port() if address.startswith("127.") else 2377
        self.cli("swarm", "init", "--advertise-addr", address, "--listen-addr", f"{address}:{port}")

    def leave_swarm(self, *, remove_bridge: bool = True) -> None:
        """Leave; the host's docker_gwbridge goes too unless another engine still uses it."""
        self.cli("swarm", "leave", "--force", check=False)
        if remove_bridge and not self.prefix:  # a namespace takes its bridge with it
            subprocess.run(
                ["ip", "link", "delete", "docker_gwbridge"], capture_output=True, check=False
            )
        if self._swarm_lock is not None:
            self._swarm_lock.close()
            self._swarm_lock = None

    def restart(self) -> None:
        """Stop the engine as its service manager would (SIGTERM) and start it again,
        keeping its images."""
        if self.proc is not None:
            stop(self.proc, timeout=30)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, timeout=30)
        unmount_below(self.root)
        if self.bridge is not None:
            self.bridge.delete()
        if self.log_path.exists():
            CANARY.keep(f"dockerd {self.sock} log", self.log_path.read_text(errors="replace"))
        shutil.rmtree(self.root, ignore_errors=True)


class Bridge:
    """A Linux bridge for one engine, on a /24 of 10.213.0.0/16 that no interface of
    this machine has yet."""

    def __init__(self) -> None:
        self.name = f"dab{secrets.token_hex(4)}"

    def create(self) -> None:
        if Path(f"/sys/class/net/{self.name}").exists():
            return  # an engine restarted keeps its bridge
        addresses = ["ip", "-4", "-o", "addr"]
        taken = subprocess.run(addresses, capture_output=True, text=True, check=True).stdout
        free = [n for n in range(256) if f" 10.213.{n}." not in taken]
        address = f"10.213.{secrets.choice(free)}.1/24"
        subprocess.run(["ip", "link", "add", self.name, "type", "bridge"], check=True)
        subprocess.run(["ip", "addr", "add", address, "dev", self.name], check=True)
        subprocess.run(["ip", "link", "set", self.name, "up"], check=True)

    def delete(self) -> None:
        subprocess.run(["ip", "link", "delete", self.name], capture_output=True, check=False)


def unmount_below(root: Path) -> None:
    """Unmount whatever is mounted at or under `root`, deepest first. An engine leaves
    a network namespace of a Swarm overlay bound to a file under its exec-root at times:
    left mounted, the namespace outlives the test and the directory cannot be removed."""
    for target in sorted(mounts_below(root), key=lambda p: len(p.parts), reverse=True):
        subprocess.run(["umount", "--lazy", str(target)], capture_output=True, check=False)


def mounts_below(root: Path) -> list[Path]:
    """The mount points at or under `root`, from this process's mount table."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = Path(_unescape(line.split()[4]))
        if target == root or root in target.parents:
            found.append(target)
    return found


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
