"""The releases layout, in which a worker installs another release beside the one it runs:

    PREFIX/bin/deploy-agent-guard        starts `current`; falls back to `previous`
    PREFIX/releases/VERSION/venv/        one virtualenv per release
    PREFIX/releases/current -> VERSION   the release the guard starts
    PREFIX/releases/previous -> VERSION  the one it falls back to
    PREFIX/releases/trial                "VERSION UPGRADE" while `current` is on trial
    PREFIX/releases/rolled-back          what the guard fell back from, and why

The guard exports DEPLOY_AGENT_RELEASES: an agent started without it (by hand, or by an
older install) cannot upgrade itself. Every method here is blocking file work: callers
run it off the event loop. Links and markers are replaced by rename, never half written.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from agent.logs import get_logger

log = get_logger(__name__)
RELEASES_ENV = "DEPLOY_AGENT_RELEASES"
CURRENT, PREVIOUS, TRIAL = "current", "previous", "trial"
TRIAL_STARTS, ROLLED_BACK = "trial.starts", "rolled-back"
STAGING_PREFIX = ".incoming-"


@dataclass(frozen=True, slots=True)
class Trial:
    version: str
    upgrade: str


@dataclass(frozen=True, slots=True)
class RolledBack:
    version: str  # the release that failed
    upgrade: str
    why: str


class Releases:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_environ(cls) -> Releases | None:
        """The layout this agent runs from, when its guard started it."""
        value = os.environ.get(RELEASES_ENV)
        if not value:
            return None
        root = Path(value)
        if not (root / CURRENT).is_symlink():
            log.warning("releases.not_a_layout", path=str(root))
            return None
        return cls(root)

    def release_dir(self, version: str) -> Path:
        return self.root / version

    def current(self) -> str | None:
        return self._target(CURRENT)

    def previous(self) -> str | None:
        return self._target(PREVIOUS)

    def _target(self, link: str) -> str | None:
        try:
            return os.readlink(self.root / link)
        except OSError:
            return None

    def trial(self) -> Trial | None:
        version, _, upgrade = self._read(TRIAL).partition(" ")
        return Trial(version, upgrade) if version else None

    def _read(self, name: str) -> str:
        try:
            return (self.root / name).read_text().strip()
        except OSError:
            return ""

    def staging(self, upgrade: str) -> Path:
        """A directory of its own for an upgrade's downloads, empty."""
        path = self.root / f"{STAGING_PREFIX}{upgrade}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700)
        return path

    def make_room(self, version: str) -> Path:
        """The directory `version` installs into, emptied first unless the guard may
        still start it (current or previous)."""
        if version in (self.current(), self.previous()):
            raise ValueError(f"release {version} is in use ({CURRENT} or {PREVIOUS})")
        path = self.release_dir(version)
        shutil.rmtree(path, ignore_errors=True)
        return path

    def switch(self, version: str, upgrade: str) -> None:
        """Make `version` current, on trial, with the running release as previous."""
        running = self.current()
        if running is not None:
            self._point(PREVIOUS, running)
        (self.root / TRIAL_STARTS).unlink(missing_ok=True)
        self._write(TRIAL, f"{version} {upgrade}")
        self._point(CURRENT, version)
        log.info("releases.switched", to=version, previous=running, upgrade=upgrade)

    def confirm(self, version: str) -> Trial | None:
        """`version` runs and reached its leader: its trial ends (the trial it was, or
        None when it was on none), and releases the guard can no longer start go."""
        trial = self.trial()
        if trial is None or trial.version != version:
            return None
        (self.root / TRIAL).unlink(missing_ok=True)
        (self.root / TRIAL_STARTS).unlink(missing_ok=True)
        self.prune()
        log.info("releases.confirmed", version=version, upgrade=trial.upgrade)
        return trial

    def take_rolled_back(self) -> RolledBack | None:
        """What the guard fell back from, once: read and removed."""
        lines = self._read(ROLLED_BACK).splitlines()
        if not lines:
            return None
        (self.root / ROLLED_BACK).unlink(missing_ok=True)
        version, _, upgrade = lines[0].partition(" ")
        return RolledBack(version, upgrade, lines[1] if len(lines) > 1 else "")

    def prune(self) -> list[str]:
        """Remove every release but current and previous, and staged downloads."""
        keep = {self.current(), self.previous()}
        removed = []
        for entry in self.root.iterdir():
            if entry.is_symlink() or not entry.is_dir() or entry.name in keep:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        return removed

    def _point(self, link: str, version: str) -> None:
        tmp = self.root / f".{link}.new"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(version)
        tmp.replace(self.root / link)

    def _write(self, name: str, text: str) -> None:
        tmp = self.root / f".{name}.new"
        with tmp.open("w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.root / name)
