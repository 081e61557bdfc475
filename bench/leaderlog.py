"""Watching a `deploy-agent run` leader from outside: its RSS and its JSON log events.

Counting links from the log keeps the observer from allocating inside the leader,
as an API or metrics scrape would.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def event_times(log: Path, event: str) -> list[float]:
    """Unix times of every `event` line in a JSON log."""
    marker = f'"{event}"'
    times = []
    for line in log.read_text().splitlines():
        if marker in line:
            stamp = json.loads(line)["timestamp"].replace("Z", "+00:00")
            times.append(datetime.datetime.fromisoformat(stamp).timestamp())
    return times


def count(log: Path, event: str) -> int:
    marker = f'"{event}"'
    return sum(marker in line for line in log.read_text().splitlines())


def links_up(log: Path) -> int:
    return count(log, "link.connected") - count(log, "link.disconnected")
