"""The run's final secret scan finds a canary wherever one is planted, and only there.

It uses a canary of its own, so what it plants does not fail the run's real scan.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from agent.worker.identity import Identity, save_identity
from tests.support.canary import Canary


def test_scan_finds_each_planted_secret_and_skips_the_credential_stores() -> None:
    """A secret in a file, log, kept text, response or argv is named; the stores are not."""
    with tempfile.TemporaryDirectory() as root:  # outside the run's tree: the run scans that
        _plant_and_scan(Path(root))


def _plant_and_scan(tmp_path: Path) -> None:
    canary = Canary(marker="planted")
    canary.issue("DAT1-" + "ab" * 32 + "-joinsecret-with-dashes")
    (tmp_path / "leader.db").write_text(canary.api_token)
    save_identity(tmp_path / "w1", Identity("n1", "node-secret-xyz", "https://l", "pem"))
    (tmp_path / "w1" / "copy.json").write_text('{"s": "node-secret-xyz"}')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "out.txt").write_text(f"x {canary.registry_password} y")
    log = tmp_path / "agent.log"
    log.write_text("joinsecret-with-dashes")
    canary.logs.add(log)
    canary.keep("captured output", f"Bearer {canary.api_token}")
    canary.responses.append(["{}", f'{{"password": "{canary.registry_password}"}}'])
    canary.argv.add(f"deploy-agent --password {canary.registry_password}")

    places = {hit.split(": ", 1)[0] for hit in canary.scan([tmp_path])}

    assert places == {
        f"file {tmp_path / 'w1' / 'copy.json'}",
        f"file {tmp_path / 'sub' / 'out.txt'}",
        f"file {log}",
        f"log {log}",
        "captured output",
        "API response 1",
        "process argv",
    }


def test_scan_of_a_clean_run_finds_nothing(tmp_path: Path) -> None:
    """Without a planted secret the scan is empty: a hit is never noise."""
    canary = Canary(marker="clean")
    (tmp_path / "a.txt").write_text("nothing to see")
    canary.keep("captured output", "leader.serving")
    assert canary.scan([tmp_path]) == []
