"""The systemd units: they verify, they rate "OK" or better in `systemd-analyze security`
with the exposure the docs record, and they say what the agent needs of systemd."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.units import analyze, directives, verify

ROOT = Path(__file__).resolve().parents[1]
UNITS = sorted((ROOT / "systemd").glob("*.service"))
GOOD_LEVELS = {"OK", "SAFE", "PERFECT"}
OVERALL = re.compile(r"Overall exposure level for (\S+): (\d+\.\d+) (\w+)")


def test_both_units_are_there() -> None:
    """The repository ships a leader and a worker unit, and the package carries the same."""
    assert [u.name for u in UNITS] == ["deploy-agent-leader.service", "deploy-agent-worker.service"]
    for unit in [*UNITS, ROOT / "systemd" / "deploy-agent-guard"]:
        assert (ROOT / "agent" / "units" / unit.name).read_text() == unit.read_text()


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.stem)
def test_unit_verifies_cleanly(unit: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a single warning."""
    executable = directives(unit.read_text())["ExecStart"][0].split()[0]
    assert verify(tmp_path, unit.name, unit.read_text(), executable) == ""


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.stem)
def test_unit_rates_ok_with_the_exposure_the_docs_record(unit: Path) -> None:
    """`systemd-analyze security --offline=yes` rates the unit OK or better, and
    docs/security.md states its exposure score as measured."""
    done = analyze("security", "--offline=yes", str(unit))
    assert done.returncode == 0, done.stderr
    found = OVERALL.search(done.stdout)
    assert found, done.stdout[-500:]
    score, level = found.group(2), found.group(3)
    assert level in GOOD_LEVELS, f"{unit.name} rated {score} {level}"
    assert f"| `{unit.name}` | {score} {level} |" in (ROOT / "docs" / "security.md").read_text()


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.stem)
def test_unit_asks_systemd_for_what_the_agent_does(unit: Path) -> None:
    """Notify with a watchdog, restart on failure but not after exit 2 (a config error),
    3 (a revoked worker) or 4 (a worker newer than its leader), its own user in the
    docker group, a state directory, and the installed program with the system config."""
    found = directives(unit.read_text())
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "Restart": ["on-failure"],
        "RestartPreventExitStatus": ["2 3 4" if "worker" in unit.name else "2 3"],
        "User": ["deploy-agent"],
        "SupplementaryGroups": ["docker"],
        "StateDirectory": ["deploy-agent"],
        "ExecStart": [
            "/opt/deploy-agent/bin/deploy-agent-guard run -c /etc/deploy-agent/config.toml"
        ],
    }
    assert {key: found.get(key) for key in expected} == expected
    assert int(found["WatchdogSec"][0]) >= 10
