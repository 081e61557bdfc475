"""`deploy-agent apps`, `history APP` and `rollback APP`: releases from a shell.

The tables are plain text, one small function per column's rendering, so that a change
of style touches one place.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from agent.cli.commands import client_for
from agent.cli.deploy import follow_to_exit

DIGEST_SHOWN = 12  # hex digits of a digest shown in a table, as `docker images` shows ids


async def apps(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        doc = await client.call("GET", "/v1/apps")
    _print_doc_or_lines(args, doc, apps_table(doc["apps"]))
    return 0


async def history(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        doc = await client.call("GET", f"/v1/apps/{args.app}", params={"limit": args.limit})
    _print_doc_or_lines(args, doc, history_table(doc["releases"]))
    return 0


async def rollback(args: argparse.Namespace) -> int:
    body = {"to": args.to} if args.to else {}
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    async with client_for(args) as client:
        dep = await client.call(
            "POST", f"/v1/apps/{args.app}/rollback", json_body=body, headers=headers
        )
        return await follow_to_exit(client, dep, no_follow=args.no_follow, as_json=args.json)


def _print_doc_or_lines(args: argparse.Namespace, doc: Any, lines: Iterable[str]) -> None:
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    for line in lines:
        print(line)


def apps_table(apps: Sequence[dict[str, Any]]) -> list[str]:
    """One row per app: its state now and its current release."""
    rows = [("APP", "STATE", "CURRENT", "KIND", "IMAGE")]
    for app in apps:
        current = app["current"] or {}
        rows.append(
            (
                app["app"],
                app["state"],
                current.get("id", "-"),
                current.get("kind", "-"),
                image_name(current.get("image")),
            )
        )
    return table(rows)


def history_table(releases: Sequence[dict[str, Any]]) -> list[str]:
    """One row per release, newest first: the current one marked, where its image is."""
    rows = [("", "ID", "WHEN", "KIND", "IMAGE", "DIGEST", "RETAINED")]
    for release in releases:
        rows.append(
            (
                "*" if release["current"] else "",
                release["id"],
                when(release.get("finished_at") or release["created_at"]),
                kind(release),
                image_name(release["image"]),
                short_digest(release.get("digest")),
                retained_where(release["retained"]),
            )
        )
    return table(rows)


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as lines of left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def kind(release: dict[str, Any]) -> str:
    if release.get("rollback_of"):
        return f"rollback to {release['rollback_of']}"
    return str(release.get("kind", "build"))


def image_name(image: str | None) -> str:
    """The image without its digest, which has a column of its own."""
    return "-" if not image else image.partition("@")[0]


def short_digest(digest: str | None) -> str:
    return "-" if not digest else digest.removeprefix("sha256:")[:DIGEST_SHOWN]


def retained_where(retained: dict[str, Any]) -> str:
    """The places that still hold the image; "gone" when every place that answered has
    lost it, "?" when none could tell."""
    places = [("leader", retained.get("leader"))]
    places += sorted((retained.get("workers") or {}).items())
    places.append(("registry", retained.get("registry")))
    held = [name for name, there in places if there]
    if held:
        return ", ".join(held)
    return "gone" if any(there is False for _, there in places) else "?"
