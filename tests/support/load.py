"""What the load test and the load benchmark share: uploads submitted at once, and
waiting until each of them is final."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.support.api import Api

FINAL = {"succeeded", "failed", "cancelled"}


def status_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of the process's /proc status (VmRSS, or VmHWM: its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


async def submit(api: Api, app: str, body: bytes) -> str:
    """Submit a gzip build context for `app`; the deployment's id."""
    status, doc = await api.request(
        "POST",
        "/v1/deployments",
        params={"app": app},
        data=body,
        headers={"Content-Type": "application/gzip"},
    )
    assert status == 202, doc
    return str(doc["id"])


async def wait_all_final(
    api: Api, apps: list[str], ids: set[str], timeout: float
) -> dict[str, Any]:
    """Poll each app's list until every id in `ids` is final; those deployments."""
    async with asyncio.timeout(timeout):
        while True:
            found: dict[str, Any] = {}
            for app in apps:
                _, doc = await api.request("GET", f"/v1/deployments?app={app}&limit=1000")
                found |= {d["id"]: d for d in doc["deployments"] if d["id"] in ids}
            if found.keys() == ids and {d["state"] for d in found.values()} <= FINAL:
                return found
            await asyncio.sleep(1)
