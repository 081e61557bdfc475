"""The hub benches still run: 20 simulated workers against a real leader hub."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from aiohttp import WSMsgType
from aiohttp._websocket.reader import WebSocketDataQueue
from aiohttp.http import WebSocketReader

from bench.simworkers import masked_frame


def _bench(
    module: str, tmp_path: Path, *args: str, enrolled: bool = True
) -> tuple[dict[str, Any], str]:
    """Run `python -m module` on 20 workers in one process; its JSON figures and output.
    `enrolled`: the bench's workers enrol with a leader (their cache goes in tmp_path).
    The run must leave nothing in the temporary directory it was given."""
    out = tmp_path / "figures.json"
    common = ["--workers", "20", "--procs", "1", "--json", str(out)]
    if enrolled:
        common += ["--state", str(tmp_path)]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", module, *common, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(scratch.iterdir()) == [], "the bench left its run's directory behind"
    return json.loads(out.read_text()), proc.stdout


def test_fanout_bench_reports_figures_for_every_acknowledgement(tmp_path: Path) -> None:
    """Two rounds over 20 workers yield 40 pull and 40 credentials latencies, all positive."""
    figures, stdout = _bench("bench.fanout", tmp_path, "--rounds", "2")
    for kind in ("pull", "credentials"):
        assert figures[kind]["n"] == 40
        assert 0 < figures[kind]["p50_ms"] <= figures[kind]["p99_ms"] <= figures[kind]["max_ms"]
    assert "p99" in stdout


def test_floor_bench_times_bare_connections_answering(tmp_path: Path) -> None:
    """Two rounds over 20 bare TLS connections: every connection's answer timed (the CPU
    figures, in clock ticks of 10 ms, may be 0 for so few answers)."""
    figures, stdout = _bench("bench.floor", tmp_path, "--tls", "--rounds", "2", enrolled=False)
    assert figures["round"]["n"] == 40
    assert (
        0 < figures["round"]["p50_ms"] <= figures["round"]["p99_ms"] <= figures["round"]["max_ms"]
    )
    assert "bare connections, TLS" in stdout
    assert "server CPU per answer" in stdout


def test_stuck_worker_bench_pairs_rounds_with_a_stalled_link(tmp_path: Path) -> None:
    """Two pairs of rounds over 20 workers: a p99 for each round, and the stuck worker's
    link stalled with orders queued behind its send."""
    figures, stdout = _bench("bench.stuck", tmp_path, "--pairs", "2")
    assert len(figures["pairs"]) == 2
    assert all(without > 0 and with_ > 0 for without, with_ in figures["pairs"])
    assert figures["fills"] >= 1
    assert min(figures["backlogs"]) > 0
    assert figures["low_ms"] <= figures["median_growth_ms"] <= figures["high_ms"]
    assert "growth" in stdout


def test_storm_bench_brings_every_worker_back_to_a_restarted_leader(tmp_path: Path) -> None:
    """A real leader process is stopped and started again under 20 workers: all come back,
    and the figures are in the order the restart makes them."""
    figures, stdout = _bench("bench.storm", tmp_path)
    assert 0 <= figures["leader_stop_s"] <= figures["leader_down_s"] <= figures["all_back_s"]
    assert 1 <= figures["peak_handshakes_per_s"] <= 20
    assert "all workers back" in stdout


def test_memory_bench_measures_the_leader_with_its_links_up(tmp_path: Path) -> None:
    """A real leader process's RSS before and with 20 idle links (no churn: its wait for
    the leader's heap trim is a minute)."""
    figures, stdout = _bench("bench.memory", tmp_path, "--tls")
    assert 0 < figures["rss_before_kib"] < figures["rss_connected_kib"]
    assert figures["kib_per_link"] > 0
    assert "KiB per link" in stdout


@pytest.mark.parametrize("size", [0, 125, 126, 65_535, 65_536])
async def test_simulated_workers_frames_read_as_a_server_reads_them(size: int) -> None:
    """A frame the simulated workers write straight to their sockets is masked and sized
    as aiohttp's server parser requires, at each length encoding's edges."""
    loop = asyncio.get_running_loop()
    queue = WebSocketDataQueue(mock.Mock(_reading_paused=False), 2**16, loop=loop)
    reader = WebSocketReader(queue, 1 << 20, compress=False, decode_text=True)
    text = "é" * (size // 2) + "x" * (size % 2)
    frame = masked_frame(text)
    assert frame[1] & 0x80, "a client's frame must be masked"
    reader.feed_data(frame)
    async with asyncio.timeout(5):  # a frame whose length is misread waits for more bytes
        message = await queue.read()
    assert (message.type, message.data) == (WSMsgType.TEXT, text)
