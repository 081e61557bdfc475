"""The live view of `deploy-agent deploy` on a terminal: stages, the build log, one
progress bar for the push and one per node for its pull, then a summary table.

rich draws it; without a terminal the plain Printer of deploy.py is used instead.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from agent.cli.output import event_line, summary_rows

_STYLES = {
    "state": "bold cyan",
    "log": "dim",
    "cache": "dim",
    "push.retry": "yellow",
    "build.retry": "yellow",
    "interrupted": "yellow",
}
# How a build step's events look: its name as it starts, then how it ended.
_STEP_STYLES = {
    "running": "bold",
    "cached": "blue",
    "done": "green",
    "cancelled": "yellow",
    "error": "bold red",
}


def _style(event: dict[str, Any]) -> str:
    kind = str(event.get("type"))
    if kind == "step":
        return _STEP_STYLES.get(str(event.get("status")), "")
    return _STYLES.get(kind, "")


class LivePrinter:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("{task.description:<24}"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            transient=False,
        )
        self._bars: dict[str, TaskID] = {}
        self._layers: dict[str, dict[str, tuple[int, int]]] = {}

    def __enter__(self) -> LivePrinter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def event(self, event: dict[str, Any]) -> None:
        kind = str(event.get("type"))
        if kind == "push":
            self._layer("push", event)
        elif kind == "pull":
            self._layer(f"pull {event['node']}", event)
        elif (text := event_line(event)) is not None:
            self._print(Text(text if kind == "state" else f"  {text}", style=_style(event)))

    def _print(self, text: Text) -> None:
        """Text as it is: a build log line holding `[dim]` or `[/]` is not markup."""
        self.console.print(text, highlight=False)

    def _layer(self, bar: str, event: dict[str, Any]) -> None:
        layers = self._layers.setdefault(bar, {})
        if event.get("layer") and event.get("total"):
            layers[event["layer"]] = (event.get("current") or 0, event["total"])
        done = sum(current for current, _ in layers.values())
        total = sum(size for _, size in layers.values()) or None
        status = event.get("status") or ("pushed" if event.get("digest") else "")
        if bar not in self._bars:
            self._bars[bar] = self.progress.add_task(bar, total=total, status=status)
        self.progress.update(self._bars[bar], completed=done, total=total, status=status)

    def summary(self, dep: dict[str, Any]) -> None:
        self.progress.stop()
        ok = dep["state"] == "succeeded"
        title = Text.assemble(
            f"deployment {dep['id']}: ", (dep["state"], "green" if ok else "bold red")
        )
        table = Table(title=title, show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for label, value in summary_rows(dep):
            table.add_row(label, Text(value, style="red" if label == "error" else ""))
        self.console.print(table)
        for line in (dep.get("error") or {}).get("log_tail") or []:
            self._print(Text(f"  | {line}"))
