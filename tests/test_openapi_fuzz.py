"""Schemathesis against the leader's own OpenAPI document: every generated request, valid
or not, gets a documented status with a documented body, never a 5xx.

DEPLOY_AGENT_FUZZ_EXAMPLES sets the examples per operation and mode (default 20, a CI run).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.errors import InvalidSchema
from schemathesis.core.result import Err, Ok
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agent.config import parse_config
from agent.leader.api.openapi import document
from agent.leader.server import Leader
from tests.support.dockerd import Dockerd
from tests.support.leader import TOKEN, base_url, leader_config

EXAMPLES = int(os.environ.get("DEPLOY_AGENT_FUZZ_EXAMPLES", "20"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
schema = schemathesis.openapi.from_dict(document())
schemathesis.serializer.alias(["application/x-tar", "application/gzip"], "application/octet-stream")


class ThreadedLeader:
    """The real Leader on an event loop of its own thread, so blocking clients can call it."""

    def __init__(self, state_dir: Path, engine_url: str) -> None:
        self.raw = leader_config(state_dir, engine_url, leader={"plain_http": None})
        self.url = base_url(self.raw)
        self.ca = str(state_dir / "tls" / "ca.pem")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.leader: Leader | None = None

    def _run(self, coro: object, timeout: float = 60) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    async def _start(self) -> None:
        self.leader = Leader(parse_config(self.raw))
        await self.leader.start()

    def start(self) -> ThreadedLeader:
        self.thread.start()
        self._run(self._start())
        return self

    def stop(self) -> None:
        if self.leader is not None:
            self._run(self.leader.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def served(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedLeader]:
    leader = ThreadedLeader(tmp_path_factory.mktemp("openapi") / "state", dockerd.url).start()
    yield leader
    leader.stop()


# One test item per operation, each with its own id: parallel test processes schedule
# items by id, and schemathesis' own parametrization gives them all the same one.
Operation = APIOperation[Any, Any, Any, Any]


def _operation(result: Ok[Operation] | Err[InvalidSchema]) -> Operation:
    """An operation of the document; one the document gets wrong fails the run here."""
    if isinstance(result, Err):
        raise result.err()
    return result.ok()


OPERATIONS = [_operation(result) for result in schema.get_all_operations()]


@pytest.mark.timeout(120 + EXAMPLES)
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_every_operation_answers_as_documented(
    operation: Operation, served: ThreadedLeader
) -> None:
    """Generated requests, valid and invalid, get a documented status and body; none a 5xx.

    Valid submissions get through to the runner, which is fine: random bytes are no tar
    with a Dockerfile and a generated git URL clones nothing, so none of them builds.
    """
    cases = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def answers_as_documented(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(
            base_url=served.url,
            headers={"Authorization": f"Bearer {TOKEN}"},
            checks=CHECKS,
            timeout=30,
            verify=served.ca,
        )

    answers_as_documented()
