"""A build's log events, and how they read as text.

A BuildKit build reports steps (`step` events: started, then cached, done, cancelled or
failed, with the time taken) and their output (`log` events that name their step); the
classic builder reports lines alone. `plain` writes them as `docker buildx build
--progress=plain` does: `#3 [2/4] RUN make`, `#3 compiling…`, `#3 DONE 1.2s`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

StepStatus = Literal["running", "cached", "done", "cancelled", "error"]


@dataclass(frozen=True, slots=True)
class BuildLine:
    """A line of output: of step `step`, or of the classic builder (no step)."""

    line: str
    step: int | None = None

    def fields(self) -> dict[str, Any]:
        return {"line": self.line} if self.step is None else {"step": self.step, "line": self.line}


@dataclass(frozen=True, slots=True)
class BuildStep:
    """A step that started, or ended as `status` after `seconds`."""

    step: int
    name: str
    status: StepStatus
    seconds: float | None = None
    error: str | None = None

    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"step": self.step, "name": self.name, "status": self.status}
        if self.seconds is not None:
            fields["seconds"] = self.seconds
        if self.error is not None:
            fields["error"] = self.error
        return fields


BuildEvent = BuildLine | BuildStep


def event_type(event: BuildEvent) -> str:
    return "log" if isinstance(event, BuildLine) else "step"


_ENDINGS = {"cached": "CACHED", "cancelled": "CANCELED"}


def plain(kind: str, event: Mapping[str, Any]) -> str | None:
    """The text of a `log` or `step` event, as buildx's plain progress writes it."""
    step = event.get("step")
    prefix = f"#{step} " if step is not None else ""
    if kind == "log":
        return f"{prefix}{event.get('line', '')}"
    if kind != "step":
        return None
    status = str(event.get("status"))
    if status == "running":
        text = str(event.get("name", ""))
    elif status == "done":
        text = f"DONE {event.get('seconds') or 0:.1f}s"
    else:
        text = _ENDINGS.get(status) or f"ERROR: {event.get('error') or 'failed'}"
    return prefix + text


def describe_build(event: dict[str, Any]) -> str:
    """A `build` event: which builder, where, for which platform, from which cache."""
    text = f"building with {event.get('builder')} on {event.get('where')}"
    if event.get("platform"):
        text += f" for {event['platform']}"
    if event.get("target"):
        text += f", stage {event['target']}"
    if event.get("cache_from"):
        text += f", cache from {', '.join(event['cache_from'])}"
    return text


def describe_cache(event: dict[str, Any]) -> str:
    text = f"cache image {event.get('image')}: {event.get('status')}"
    return text + (f" ({event['error']})" if event.get("error") else "")
