"""Schemathesis against the leader's own OpenAPI document: every generated request, valid
or not, gets a documented status with a documented body, never a 5xx; and its command
line, with every check it has (`--checks all`), finds nothing: what the document calls
valid is accepted, what it calls invalid refused, a 405 names the allowed methods.

DEPLOY_AGENT_FUZZ_EXAMPLES sets the examples per operation and mode (default 20, a CI run).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS as CHECKS_REGISTRY
from schemathesis.core.errors import InvalidSchema
from schemathesis.core.result import Err, Ok
from schemathesis.schemas import APIOperation

from agent.config import parse_config
from agent.leader.api.openapi import document
from agent.leader.server import Leader
from tests.support import schemathesis_hooks  # noqa: F401 (registers the tar serializer)
from tests.support.dockerd import Dockerd
from tests.support.leader import TOKEN, base_url, leader_config

EXAMPLES = int(os.environ.get("DEPLOY_AGENT_FUZZ_EXAMPLES", "20"))
CLI_EXAMPLES = max(EXAMPLES // 2, 5)  # per operation and phase: it runs four phases
CHECKS: Any = CHECKS_REGISTRY.get_all()  # every check schemathesis has
# What no schema can state: whether an upload's bytes are a tar with a Dockerfile, and
# whether a submission's `image` suits the leader's mode and registry host (a 400 says
# which); whether a registry exists and takes the credentials (a 422 with its reason).
CLI_CONFIG = """
[[operations]]
include-path = "/v1/deployments"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409"]

[[operations]]
include-path = "/v1/registry"
include-method = "PUT"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422"]
"""
schema = schemathesis.openapi.from_dict(document())


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


@pytest.mark.timeout(120 + 20 * CLI_EXAMPLES)
def test_schemathesis_with_every_check_finds_nothing(
    served: ThreadedLeader, tmp_path: Path
) -> None:
    """`schemathesis run --checks all` (its examples, coverage, fuzzing and stateful
    phases) against the served document: 0 failures. Before, it found a `limit` of 0,
    a JSON body without a source and a malformed join token that the document called
    valid but the leader refused, and 405 answers without an Allow header."""
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(document()))
    config = tmp_path / "schemathesis.toml"
    config.write_text(CLI_CONFIG)
    cli = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run(
        [
            *(str(cli), "--config-file", str(config), "--no-color", "run", str(spec)),
            *("--url", served.url, "-H", f"Authorization: Bearer {TOKEN}", "--checks", "all"),
            *("--max-examples", str(CLI_EXAMPLES), "--tls-verify", served.ca, "--seed", "1"),
        ],
        cwd=tmp_path,  # its cache goes there
        env={
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.support.schemathesis_hooks",
            "PYTHONPATH": str(Path(__file__).parent.parent),
        },
        capture_output=True,
        text=True,
        timeout=60 + 20 * CLI_EXAMPLES,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
