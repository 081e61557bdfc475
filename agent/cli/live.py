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

from agent.buildlog import describe_build, describe_cache, plain

# How a build step's events look: its name as it starts, then how it ended.
_STEP_STYLES = {
    "running": "bold",
    "cached": "blue",
    "done": "green",
    "cancelled": "yellow",
    "error": "bold red",
}


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
        kind = event.get("type")
        if kind == "state":
            self.console.print(f"[bold cyan]==> {event['state']}[/]")
        elif kind == "log":
            self.console.print(Text(f"  {plain('log', event)}", style="dim"))
        elif kind == "step":
            style = _STEP_STYLES.get(event.get("status", ""), "")
            self.console.print(Text(f"  {plain('step', event)}", style=style))
        elif kind == "build":
            self.console.print(Text(f"  {describe_build(event)}"))
        elif kind == "cache":
            self.console.print(Text(f"  {describe_cache(event)}", style="dim"))
        elif kind == "push":
            self._layer("push", event)
        elif kind == "pull":
            self._layer(f"pull {event['node']}", event)
        elif kind == "push.retry":
            self.console.print(
                f"  [yellow]push retry {event['attempt']} in {event['wait_s']} s:"
                f" {event['error']}[/]"
            )
        elif kind == "release" and "running" in event:
            self.console.print(
                f"  {event['service']}: {event['running']}/{event['desired']} "
                f"running ({event.get('update_state') or 'new'})"
            )

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
        colour = "green" if dep["state"] == "succeeded" else "red"
        table = Table(title=f"deployment {dep['id']}: [{colour}]{dep['state']}[/]")
        table.add_column("")
        table.add_column("")
        table.add_row("image", dep["image"])
        for stage, timing in dep.get("stages", {}).items():
            table.add_row(stage, f"{timing.get('seconds') or 0:.1f} s")
        for node, result in (dep.get("nodes") or {}).items():
            table.add_row(
                f"node {node}",
                result["status"] + (f": {result['error']}" if result.get("error") else ""),
            )
        error = dep.get("error")
        if error:
            table.add_row("error", f"[red]{error['code']}[/]: {error['message']}")
            if error.get("hint"):
                table.add_row("hint", error["hint"])
        self.console.print(table)
        for line in (error or {}).get("log_tail") or []:
            self.console.print(f"  | {line}", markup=False, highlight=False)
