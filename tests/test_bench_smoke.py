"""The fan-out bench still runs: 20 simulated workers against a real leader hub."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_fanout_bench_reports_figures_for_every_acknowledgement(tmp_path: Path) -> None:
    """Two rounds over 20 workers yield 40 pull and 40 credentials latencies, all positive."""
    out = tmp_path / "figures.json"
    args = ["--workers", "20", "--rounds", "2", "--procs", "1", "--state", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fanout", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(out.read_text())
    for kind in ("pull", "credentials"):
        assert figures[kind]["n"] == 40
        assert 0 < figures[kind]["p50_ms"] <= figures[kind]["p99_ms"] <= figures[kind]["max_ms"]
    assert "p99" in proc.stdout
