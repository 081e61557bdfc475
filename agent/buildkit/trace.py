"""BuildKit's `moby.buildkit.trace` messages, decoded into the steps and lines of a build.

Each message is a base64 protobuf `StatusResponse` (decoded with the classes generated from
BuildKit's control.proto): vertexes (the steps, with start, end, cached and error), their
output in chunks, progress of sub-tasks, and warnings. A vertex repeats in many messages;
the decoder remembers each one and reports every change of state once.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from agent.buildkit.control_pb2 import StatusResponse, Vertex, VertexLog, VertexStatus
from agent.buildlog import BuildEvent, BuildLine, BuildStep, StepStatus
from agent.logs import get_logger

log = get_logger(__name__)
TRACE_ID = "moby.buildkit.trace"
# How BuildKit names a vertex stopped because another one failed.
_CANCELLED = "context canceled"


@dataclass(slots=True)
class _Vertex:
    number: int
    name: str
    started: float | None = None
    finished: bool = False
    partial: str = ""


class TraceDecoder:
    """Turns the trace messages of one build into build events, in order."""

    def __init__(self) -> None:
        self._vertexes: dict[str, _Vertex] = {}
        self._statuses_done: set[tuple[str, str]] = set()

    def feed(self, aux: object) -> list[BuildEvent]:
        """The events one trace message (its `aux`) adds; none for one that cannot be read."""
        try:
            message = StatusResponse.FromString(base64.b64decode(str(aux), validate=True))
        except (binascii.Error, DecodeError, ValueError) as exc:
            log.warning("build.trace_unreadable", error=str(exc))
            return []
        events: list[BuildEvent] = []
        # A step's end follows its output of the same message: a step without any there
        # ends at once, so that `CACHED` follows its own name.
        talking = {chunk.vertex for chunk in message.logs}
        talking |= {status.vertex for status in message.statuses}
        talking |= {warning.vertex for warning in message.warnings}
        for vertex in message.vertexes:
            events += self._started(vertex)
            if vertex.digest not in talking:
                events += self._finished(vertex)
        for chunk in message.logs:
            events += self._output(chunk)
        for status in message.statuses:
            events += self._status(status)
        for warning in message.warnings:
            known = self._vertexes.get(warning.vertex)
            text = warning.short.decode(errors="replace").strip()
            events.append(BuildLine(f"WARN: {text}", known.number if known else None))
        for vertex in message.vertexes:
            if vertex.digest in talking:
                events += self._finished(vertex)
        return events

    def flush(self) -> list[BuildEvent]:
        """Output left without its line end when the stream ended."""
        events: list[BuildEvent] = []
        for state in self._vertexes.values():
            events += self._rest(state)
        return events

    def _started(self, vertex: Vertex) -> list[BuildEvent]:
        state = self._vertexes.get(vertex.digest)
        if state is None:
            if not (vertex.HasField("started") or vertex.HasField("completed")):
                return []  # queued: it is announced when it starts, numbered then
            state = _Vertex(number=len(self._vertexes) + 1, name=vertex.name)
            self._vertexes[vertex.digest] = state
            if vertex.HasField("started"):
                state.started = _seconds(vertex.started)
            return [BuildStep(state.number, state.name, "running")]
        if state.started is None and vertex.HasField("started"):
            state.started = _seconds(vertex.started)
        return []

    def _finished(self, vertex: Vertex) -> list[BuildEvent]:
        state = self._vertexes.get(vertex.digest)
        if state is None or state.finished or not (vertex.HasField("completed") or vertex.error):
            return []
        state.finished = True
        events = self._rest(state)
        seconds = None
        if state.started is not None and vertex.HasField("completed"):
            seconds = round(max(_seconds(vertex.completed) - state.started, 0.0), 3)
        if vertex.error:
            cancelled = vertex.error.strip().endswith(_CANCELLED)
            status: StepStatus = "cancelled" if cancelled else "error"
            error = None if cancelled else vertex.error
            events.append(BuildStep(state.number, state.name, status, seconds, error))
        elif vertex.cached:
            events.append(BuildStep(state.number, state.name, "cached"))
        else:
            events.append(BuildStep(state.number, state.name, "done", seconds))
        return events

    def _output(self, chunk: VertexLog) -> list[BuildEvent]:
        state = self._vertexes.get(chunk.vertex)
        if state is None:
            return []
        *lines, state.partial = (state.partial + chunk.msg.decode(errors="replace")).split("\n")
        return [BuildLine(line.rstrip("\r"), state.number) for line in lines]

    def _status(self, status: VertexStatus) -> list[BuildEvent]:
        """A sub-task (exporting layers, pulling a blob) is told once, when it ends."""
        state = self._vertexes.get(status.vertex)
        key = (status.vertex, status.ID)
        if state is None or not status.HasField("completed") or key in self._statuses_done:
            return []
        self._statuses_done.add(key)
        size = f" {status.current}/{status.total}" if status.total else ""
        return [BuildLine(f"{status.ID}{size} done", state.number)]

    @staticmethod
    def _rest(state: _Vertex) -> list[BuildEvent]:
        if not state.partial:
            return []
        line, state.partial = state.partial, ""
        return [BuildLine(line.rstrip("\r"), state.number)]


def _seconds(stamp: Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9
