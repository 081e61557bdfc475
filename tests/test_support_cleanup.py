"""The test harness cleans up after itself: what a test's engine leaves is removed."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.dockerd import Dockerd, mounts_below, unmount_below


def _bind_netns(target: Path) -> None:
    """Bind a network namespace to a file, as an engine does for a Swarm overlay."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.touch()
    subprocess.run(["mount", "--bind", "/proc/self/ns/net", str(target)], check=True)


def test_a_stopped_engine_leaves_no_namespace_mounted() -> None:
    """Namespaces still bound under an engine's exec-root when it stops (one with a space
    in its name, which the mount table escapes) are unmounted and its directory removed."""
    engine = Dockerd()  # its directory only: the engine was never started
    bound = [engine.root / "x" / "netns" / "1-overlay", engine.root / "x" / "netns" / "a b"]
    try:
        for target in bound:
            _bind_netns(target)
        assert sorted(mounts_below(engine.root)) == sorted(bound)
        engine.stop()
        assert mounts_below(engine.root) == []
        assert not engine.root.exists()
    finally:
        unmount_below(engine.root)
        subprocess.run(["rm", "-rf", str(engine.root)], check=False)
