"""The build log's fast layer: BuildKit trace messages (made with the generated classes)
decoded into steps and lines, their plain text, and `--link` taken off for old engines.
The real engine's traces are decoded in tests/test_buildkit.py."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp
from structlog.testing import capture_logs

from agent.buildkit.control_pb2 import (
    StatusResponse,
    Vertex,
    VertexLog,
    VertexStatus,
    VertexWarning,
)
from agent.buildkit.trace import TraceDecoder
from agent.buildlog import BuildLine, BuildStep, event_type, plain
from agent.leader.pipeline.context_files import without_link

RUN = "sha256:" + "a" * 64
COPY = "sha256:" + "b" * 64


def _at(seconds: float) -> Timestamp:
    return Timestamp(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))


def _aux(message: StatusResponse) -> str:
    return base64.b64encode(message.SerializeToString()).decode()


def _feed(decoder: TraceDecoder, **parts: list[object]) -> list[str]:
    events = decoder.feed(_aux(StatusResponse(**parts)))  # type: ignore[arg-type]
    return [str(plain(event_type(e), e.fields())) for e in events]


def test_a_step_is_announced_when_it_starts_and_done_with_its_time() -> None:
    """Queued, started, completed: one `running` event when it starts (numbered then),
    one `done` with the time between start and end; repeats of the vertex add nothing."""
    decoder = TraceDecoder()
    queued = Vertex(digest=RUN, name="[1/1] RUN make")
    started = Vertex(digest=RUN, name="[1/1] RUN make", started=_at(10.0))
    done = Vertex(digest=RUN, name="[1/1] RUN make", started=_at(10.0), completed=_at(12.25))

    assert _feed(decoder, vertexes=[queued]) == []
    assert _feed(decoder, vertexes=[started]) == ["#1 [1/1] RUN make"]
    assert _feed(decoder, vertexes=[started]) == []
    assert _feed(decoder, vertexes=[done]) == ["#1 DONE 2.2s"]
    assert _feed(decoder, vertexes=[done]) == []


def test_output_is_cut_into_lines_per_step_and_ends_before_the_step_does() -> None:
    """Chunks of output join into lines of their own step; what is left without a line
    end comes out when the step completes, before its DONE."""
    decoder = TraceDecoder()
    start = Vertex(digest=RUN, name="RUN", started=_at(1))
    _feed(decoder, vertexes=[start])
    assert _feed(decoder, logs=[VertexLog(vertex=RUN, msg=b"compil")]) == []
    assert _feed(decoder, logs=[VertexLog(vertex=RUN, msg=b"ing\r\nlinking")]) == ["#1 compiling"]
    end = Vertex(digest=RUN, name="RUN", started=_at(1), completed=_at(2))
    assert _feed(decoder, vertexes=[end]) == ["#1 linking", "#1 DONE 1.0s"]


def test_cached_failed_and_cancelled_steps_end_as_such() -> None:
    """A cached vertex: CACHED after its name; an error: ERROR with it; a vertex stopped
    because another failed: CANCELED."""
    decoder = TraceDecoder()
    cached = Vertex(digest=COPY, name="COPY", cached=True, started=_at(1), completed=_at(1))
    failed = Vertex(digest=RUN, name="RUN", started=_at(1), completed=_at(3), error="exit code: 2")
    other = "sha256:" + "c" * 64
    cancelled = Vertex(digest=other, name="RUN b", started=_at(1), error="context canceled")

    assert _feed(decoder, vertexes=[cached]) == ["#1 COPY", "#1 CACHED"]
    assert _feed(decoder, vertexes=[failed, cancelled]) == [
        "#2 RUN",
        "#2 ERROR: exit code: 2",
        "#3 RUN b",
        "#3 CANCELED",
    ]


def test_sub_tasks_and_warnings_are_lines_of_their_step() -> None:
    """A sub-task (exporting layers) is one line when it completes; a warning is a line."""
    decoder = TraceDecoder()
    _feed(decoder, vertexes=[Vertex(digest=RUN, name="exporting", started=_at(1))])
    running = VertexStatus(ID="exporting layers", vertex=RUN)
    finished = VertexStatus(ID="exporting layers", vertex=RUN, completed=_at(2))
    warning = VertexWarning(vertex=RUN, short=b"legacy form")

    assert _feed(decoder, statuses=[running]) == []
    assert _feed(decoder, statuses=[finished], warnings=[warning]) == [
        "#1 exporting layers done",
        "#1 WARN: legacy form",
    ]


def test_an_unreadable_trace_message_is_logged_and_skipped() -> None:
    """Not base64, or not a StatusResponse: no events, a warning in the log, no error."""
    decoder = TraceDecoder()
    with capture_logs() as logs:
        assert decoder.feed("not base64!") == []
        assert decoder.feed(base64.b64encode(b"\xff\xff\xff").decode()) == []

    assert [entry["event"] for entry in logs] == ["build.trace_unreadable"] * 2


def test_plain_text_of_each_event() -> None:
    """As buildx --progress=plain writes them; the classic builder's lines have no number."""
    assert plain("log", BuildLine("hello", 3).fields()) == "#3 hello"
    assert plain("log", BuildLine("Step 1/2 : FROM scratch").fields()) == "Step 1/2 : FROM scratch"
    assert plain("step", BuildStep(4, "RUN x", "done", 1.25).fields()) == "#4 DONE 1.2s"
    assert plain("step", BuildStep(4, "RUN x", "error", error="boom").fields()) == "#4 ERROR: boom"
    assert plain("state", {}) is None


def test_link_comes_off_copy_and_add_only() -> None:
    """--link (and --link=true/false) leaves COPY and ADD, in any case, with their other
    flags and their arguments as they were; elsewhere nothing changes."""
    dockerfile = "\n".join(
        [
            "FROM scratch",
            "COPY --link a b",
            "copy --chown=1:1 --link=true src /dst",
            "  ADD --link --chmod=755 x /y",
            'COPY ["--link", "b"]',
            "RUN echo --link",
            "COPY --linked a b",
        ]
    )

    assert without_link(dockerfile).split("\n") == [
        "FROM scratch",
        "COPY a b",
        "copy --chown=1:1 src /dst",
        "  ADD --chmod=755 x /y",
        'COPY ["--link", "b"]',
        "RUN echo --link",
        "COPY --linked a b",
    ]


def test_the_generated_classes_are_what_the_script_makes_of_the_protos() -> None:
    """agent/buildkit/*_pb2.py(i) are scripts/gen-buildkit-proto's output for the .proto
    files in proto/buildkit: nobody edited them by hand, nor changed one without the other."""
    script = Path(__file__).parent.parent / "scripts" / "gen_buildkit_proto.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr
