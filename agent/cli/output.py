"""What the command line prints for people: one plain line per deployment event, a
deployment's summary as (label, value) rows, and tables with a header or a sentence
saying there is nothing. The terminal view (live.py) and the plain printer (deploy.py)
share them; `--json` prints the API's documents instead and never comes here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from agent.buildlog import describe_build, describe_cache, plain

Event = Mapping[str, Any]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned columns under a header line; the last column is not padded."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = [str(c).ljust(w) for c, w in zip(cells[:-1], widths, strict=False)]
        return "  ".join([*padded, str(cells[-1])]).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, empty: str, out: TextIO | None = None
) -> None:
    """The table, or the sentence `empty` when there are no rows."""
    for text in table(headers, rows) if rows else [empty]:
        print(text, file=out or sys.stdout)


def event_line(event: Event) -> str | None:
    """One readable line for a deployment event; None for those shown otherwise (a
    pull's layer progress, a push layer still under way)."""
    describe = _DESCRIBE.get(str(event.get("type")), _generic)
    return describe(event)


def _state(event: Event) -> str:
    return f"==> {event['state']}"


def _source(event: Event) -> str:
    if "commit" in event:
        return f"checked out commit {event['commit']}"
    return f"cloning {event.get('url')} at {event.get('ref')}"


def _push(event: Event) -> str | None:
    if event.get("digest"):
        return f"pushed {event['digest']}"
    if event.get("status") in ("Pushed", "Layer already exists"):
        return f"{event['layer']}: {event['status']}"
    return None


def _push_retry(event: Event) -> str:
    return f"push retry {event['attempt']} in {event['wait_s']} s: {event['error']}"


def _distribution(event: Event) -> str:
    if "nodes" in event:
        nodes = event["nodes"] or {}
        return "pulled: " + ("; ".join(node_result(n, r) for n, r in nodes.items()) or "no worker")
    workers = event.get("workers", 0)
    if not workers:
        return "no worker connected: nothing to pull now"
    return f"{workers} worker(s) pulling {event.get('image')}"


def node_result(name: str, result: Mapping[str, Any]) -> str:
    """`w1 present`, `w2 failed: no space left`, `w3 pending: offline`."""
    why = result.get("error") or result.get("reason")
    return f"{name} {result.get('status')}" + (f": {why}" if why else "")


_ROLLBACK = {
    "rollback_started": "rolling back to the previous version",
    "rollback_paused": "its rollback to the previous version is paused",
    "rollback_completed": "rolled back to the previous version",
}
_UPDATE = {None: "starting", "updating": "updating", "completed": "updated", "paused": "paused"}


def _release(event: Event) -> str:
    service = event.get("service", "")
    if "running" in event:
        return f"{service}: {_release_progress(event)}"
    action = event.get("action")
    if action == "credentials_to_swarm":
        return "registry credentials sent to Swarm: a node may have to pull the image"
    if action == "pulled_on_leader":
        return f"pulled {event.get('image')} on the leader's engine"
    if event.get("error"):
        return f"{service}: {action}: {event['error']}"
    return f"{service}: {_ACTIONS.get(str(action), str(action))}"


_ACTIONS = {
    "create": "created",
    "update": "updated to the new image",
    "applied_already": "already on the new image",
    "removed": "removed",
}


def _release_progress(event: Event) -> str:
    """What runs now: during a rollback the previous version does, not nothing."""
    state = event.get("update_state")
    others = event.get("others_running")
    if state in _ROLLBACK:
        runs = f"; {others} task(s) of the previous version running" if others is not None else ""
        return f"the new version failed, {_ROLLBACK[state]}{runs}"
    phase = _UPDATE.get(state, str(state))
    text = f"{phase}, {event['running']}/{event['desired']} task(s) of the new version running"
    return text + (f", {others} of the previous" if others else "")


def _retention(event: Event) -> str:
    where = f" on {event['where']}" if event.get("where") else ""
    if event.get("error"):
        return f"old images not removed{where}: {event['error']}"
    removed, kept = event.get("removed", 0), event.get("kept")
    return f"removed {removed} old image(s){where}, keeping the newest {kept}"


def _resumed(event: Event) -> str:
    return f"resumed after a leader restart (attempt {event.get('attempt')})"


def _interrupted(_: Event) -> str:
    return "interrupted: the leader is stopping; it resumes this deployment when it starts again"


def _nothing(_: Event) -> None:
    return None


def _generic(event: Event) -> str:
    """An event this version does not know (a newer leader's): its fields, as JSON."""
    fields = {k: v for k, v in event.items() if k not in ("seq", "at", "type")}
    details = " ".join(f"{k}={json.dumps(v)}" for k, v in fields.items())
    return f"{event.get('type')}: {details}".rstrip(": ")


_DESCRIBE: dict[str, Callable[[Event], str | None]] = {
    "state": _state,
    "log": lambda event: plain("log", event),
    "step": lambda event: plain("step", event),
    "build": lambda event: describe_build(dict(event)),
    "cache": lambda event: describe_cache(dict(event)),
    "build.retry": lambda event: f"build again: {event.get('error')}",
    "source": _source,
    "push": _push,
    "push.retry": _push_retry,
    "pull": _nothing,
    "distribution": _distribution,
    "release": _release,
    "retention": _retention,
    "resumed": _resumed,
    "interrupted": _interrupted,
}


def summary_rows(dep: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A finished deployment as (label, value) rows: its image, each stage's time, each
    node's result, and its error and hint. The build log's tail is not among them."""
    rows = [("image", image_of(dep))]
    for stage, timing in (dep.get("stages") or {}).items():
        rows.append((stage, f"{timing.get('seconds') or 0:.1f} s"))
    for name, result in (dep.get("nodes") or {}).items():
        rows.append((f"node {name}", node_result(name, result).removeprefix(f"{name} ")))
    error = dep.get("error")
    if error:
        rows.append(("error", f"{error['code']}: {error['message']}"))
        if error.get("hint"):
            rows.append(("hint", error["hint"]))
    return rows


def image_of(dep: Mapping[str, Any]) -> str:
    """The deployment's image, or why there is none."""
    return str(dep.get("image")) if built(dep) else "none (not built)"


def built(dep: Mapping[str, Any]) -> bool:
    """Does the image a deployment names exist? One that failed before its build
    finished names an image that was never made."""
    return bool(dep.get("state") == "succeeded" or dep.get("image_id") or dep.get("digest"))
