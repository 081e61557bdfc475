"""What every part of the leader shares: config, store, journal, engine, registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.config import LeaderConfig
from agent.engine import Engine
from agent.leader.links.hub import Hub
from agent.leader.metrics import LeaderMetrics
from agent.leader.pipeline.build_server import Builders
from agent.leader.pipeline.sources import GitCredentials
from agent.leader.registry.credentials import RegistryService
from agent.leader.state.journal import Journal
from agent.leader.state.store import Store
from agent.tls import LeaderTLS


@dataclass(frozen=True, slots=True)
class LeaderContext:
    config: LeaderConfig
    state_dir: Path
    store: Store
    journal: Journal
    engine: Engine
    registry: RegistryService
    hub: Hub
    tls: LeaderTLS | None
    metrics: LeaderMetrics
    builders: Builders
    git_credentials: GitCredentials = field(default_factory=GitCredentials)

    @property
    def contexts_dir(self) -> Path:
        return self.state_dir / "contexts"

    def context_path(self, dep_id: str) -> Path:
        return self.contexts_dir / f"{dep_id}.tar"
