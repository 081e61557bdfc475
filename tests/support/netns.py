"""Simulated hosts: network namespaces joined by a bridge, each with its own address.

Everything made here (namespaces, links, the firewall rule, the bridge's address) is
removed by `close`, also after a failed test. Traffic stays between these namespaces
(and the test's own process, when the bridge has an address).
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from dataclasses import dataclass, field

SUBNET = "10.213.{net}.{host}"


def _run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=30)


def _tbf(mbit: int) -> list[str]:
    """A token bucket (netem is not in every kernel); the burst covers loopback's 64 KiB
    packets, the latency bounds the queue."""
    return ["tbf", "rate", f"{mbit}mbit", "burst", "128kb", "latency", "500ms"]


@dataclass
class Hosts:
    """A bridge with one namespace per host; `address(name)` is the host's IP."""

    names: list[str]
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    net: int = 77
    gateway: bool = False  # give the bridge an address, so the test reaches every host
    _undo: list[list[str]] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"dab{self.tag}"

    def netns(self, name: str) -> str:
        return f"da-{self.tag}-{name}"

    def address(self, name: str) -> str:
        return SUBNET.format(net=self.net, host=10 + self.names.index(name))

    def nsenter(self, name: str) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.netns(name)}"]

    def open(self) -> Hosts:
        self._do(
            ["ip", "link", "add", self.bridge, "type", "bridge"],
            ["ip", "link", "delete", self.bridge],
        )
        _run("ip", "link", "set", self.bridge, "up")
        if self.gateway:
            _run(
                "ip", "addr", "add", SUBNET.format(net=self.net, host=1) + "/24", "dev", self.bridge
            )
        self._do(
            ["iptables", "-I", "FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"],
            ["iptables", "-D", "FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"],
        )
        for index, name in enumerate(self.names):
            self._add_host(name, index)
        return self

    def outside(self, name: str) -> str:
        """The host's end of the link on the bridge side, in the test's namespace."""
        return f"dav{self.tag}{self.names.index(name)}"

    def cut(self, name: str) -> None:
        """Take the host's link down: it reaches no other host, and none reaches it."""
        _run("ip", "-n", self.netns(name), "link", "set", "eth0", "down")

    def heal(self, name: str) -> None:
        """Bring the host's link back up, with its address and route."""
        _run("ip", "-n", self.netns(name), "link", "set", "eth0", "up")

    def throttle(self, name: str, mbit: int) -> None:
        """Slow what the host receives over its link to `mbit` megabit per second."""
        _run(
            "tc",
            "qdisc",
            "replace",
            "dev",
            self.outside(name),
            "root",
            *_tbf(mbit),
        )

    def throttle_loopback(self, name: str, mbit: int) -> None:
        """Slow traffic between the services of one host (its loopback and own address)."""
        ns = self.netns(name)
        _run("tc", "-n", ns, "qdisc", "replace", "dev", "lo", "root", *_tbf(mbit))

    def unthrottle(self, name: str) -> None:
        """Remove every throttle from the host; quiet when there is none."""
        for cmd in (
            ["tc", "qdisc", "del", "dev", self.outside(name), "root"],
            ["tc", "-n", self.netns(name), "qdisc", "del", "dev", "lo", "root"],
        ):
            subprocess.run(cmd, capture_output=True, timeout=30, check=False)

    def _add_host(self, name: str, index: int) -> None:
        ns, outside, inside = self.netns(name), f"dav{self.tag}{index}", "eth0"
        self._do(["ip", "netns", "add", ns], ["ip", "netns", "delete", ns])
        self._do(
            ["ip", "link", "add", outside, "type", "veth", "peer", "name", f"dai{self.tag}{index}"],
            ["ip", "link", "delete", outside],
        )
        _run("ip", "link", "set", f"dai{self.tag}{index}", "netns", ns)
        _run("ip", "-n", ns, "link", "set", f"dai{self.tag}{index}", "name", inside)
        _run("ip", "link", "set", outside, "master", self.bridge, "up")
        _run("ip", "-n", ns, "addr", "add", f"{self.address(name)}/24", "dev", inside)
        _run("ip", "-n", ns, "link", "set", inside, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")

    def _do(self, action: list[str], undo: list[str]) -> None:
        _run(*action)
        self._undo.append(undo)

    def close(self) -> None:
        for undo in reversed(self._undo):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(undo, capture_output=True, timeout=30, check=False)
        self._undo.clear()
