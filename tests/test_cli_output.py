"""What the command line prints for people: plain lines without a terminal (never a
Python repr), tables with a header or a sentence for nothing, the summary's image only
when it exists. The events are the leader's own, as its journal records them."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest

from agent.cli.deploy import Printer
from agent.cli.output import event_line, print_table, summary_rows

# One of each kind a deployment's stream carries, as the leader writes them.
EVENTS: list[tuple[dict[str, Any], str]] = [
    ({"type": "state", "state": "building"}, "==> building"),
    ({"type": "source", "url": "https://git.example/acme/api.git", "ref": "main"},
     "cloning https://git.example/acme/api.git at main"),
    ({"type": "source", "commit": "3f9c2d1"}, "checked out commit 3f9c2d1"),
    ({"type": "log", "line": "[dim]Step 1/7 : FROM scratch[/]"}, "[dim]Step 1/7 : FROM scratch[/]"),
    ({"type": "resumed", "attempt": 2}, "resumed after a leader restart (attempt 2)"),
    ({"type": "distribution", "workers": 2, "image": "r.example/acme/api@sha256:ab"},
     "2 worker(s) pulling r.example/acme/api@sha256:ab"),
    ({"type": "distribution", "nodes": {"w1": {"status": "present", "seconds": 0.4},
                                        "w2": {"status": "failed", "error": "no space left"}}},
     "pulled: w1 present; w2 failed: no space left"),
    ({"type": "release", "service": "api_web", "action": "update"},
     "api_web: updated to the new image"),
    ({"type": "release", "service": "api_web", "running": 1, "others_running": 1, "desired": 2,
      "update_state": "updating"},
     "api_web: updating, 1/2 task(s) of the new version running, 1 of the previous"),
    ({"type": "release", "service": "api_web", "running": 0, "others_running": 1, "desired": 1,
      "update_state": "rollback_started"},
     "api_web: the new version failed, rolling back to the previous version; 1 task(s) of the "
     "previous version running"),
    ({"type": "retention", "removed": 2, "kept": 5},
     "removed 2 old image(s), keeping the newest 5"),
    ({"type": "interrupted"},
     "interrupted: the leader is stopping; it resumes this deployment when it starts again"),
    ({"type": "brand.new", "nodes": {"w1": "x"}}, 'brand.new: nodes={"w1": "x"}'),
]  # fmt: skip


@pytest.mark.parametrize(("event", "line"), EVENTS, ids=[f"{e['type']}" for e, _ in EVENTS])
def test_each_event_reads_as_one_plain_line(event: dict[str, Any], line: str) -> None:
    """Every kind of event has words of its own; one this version does not know shows
    its fields as JSON. None is a Python repr."""
    assert event_line({"seq": 1, "at": 1.0, **event}) == line


def test_the_plain_printer_writes_no_python_repr() -> None:
    """Without a terminal, `deploy` prints every event and the summary as text, none
    as a Python dict would show (`{'attempt': 2}`)."""
    out = io.StringIO()
    printer = Printer(out)
    for event, _ in EVENTS:
        printer.event(event)
    printer.summary(_failed_before_the_build())
    text = out.getvalue()
    assert not re.search(r"\{'\w+': ", text), text  # a Python dict's repr
    assert "    cloning https://git.example/acme/api.git at main\n" in text


def _failed_before_the_build() -> dict[str, Any]:
    return {
        "id": "d-1", "state": "failed", "image": "api:d-1", "image_id": None, "digest": None,
        "stages": {"building": {"seconds": 0.2}}, "nodes": {},
        "error": {"code": "source_unavailable", "message": "git clone failed", "hint": "check"},
    }  # fmt: skip


def test_a_deployment_that_failed_before_its_build_names_no_image() -> None:
    """The summary does not name an image that was never made; a built one is named."""
    rows = dict(summary_rows(_failed_before_the_build()))
    assert rows["image"] == "none (not built)"
    assert rows["error"] == "source_unavailable: git clone failed" and rows["hint"] == "check"
    built = _failed_before_the_build() | {"image_id": "sha256:1"}
    assert dict(summary_rows(built))["image"] == "api:d-1"


def test_a_table_has_a_header_and_nothing_is_said_in_words() -> None:
    """Rows line up under their header; no rows print the sentence instead."""
    out = io.StringIO()
    print_table(("ID", "APP"), [("d-1", "web"), ("d-22", "api")], empty="no deployments", out=out)
    assert out.getvalue() == "ID    APP\nd-1   web\nd-22  api\n"
    out = io.StringIO()
    print_table(("ID", "APP"), [], empty="no deployments", out=out)
    assert out.getvalue() == "no deployments\n"
