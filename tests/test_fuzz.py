"""Property-based bad input: whatever a client or a rogue worker sends, the leader
answers with a 4xx JSON error (or accepts a valid request), never a 5xx, never dies,
and a refused request changes nothing."""

from __future__ import annotations

import io
import tarfile
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.leader import InProcessLeader

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
KEYS = [
    "app",
    "git",
    "dockerfile",
    "build_args",
    "labels",
    "image",
    "services",
    "prune",
    "allow_manager_placement",
    "url",
    "ref",
    "name",
    "command",
    "replicas",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


async def _count(leader: InProcessLeader) -> int:
    _, doc = await leader.api.request("GET", "/v1/deployments?limit=1000")
    return len(doc["deployments"])


def _check(status: int, doc: Any) -> None:
    assert status < 500, doc
    if status >= 400:
        assert isinstance(doc, dict) and doc["error"]["code"] and doc["error"]["message"]


@FUZZ
@given(body=json_values)
async def test_any_json_body(leader: InProcessLeader, body: Any) -> None:
    before = await _count(leader)
    status, doc = await leader.api.request("POST", "/v1/deployments", json=body)
    _check(status, doc)
    if status >= 400:
        assert await _count(leader) == before


@FUZZ
@given(raw=st.binary(max_size=200))
async def test_any_bytes_as_json_or_tar(leader: InProcessLeader, raw: bytes) -> None:
    before = await _count(leader)
    for content_type in ("application/json", "application/x-tar", "application/gzip"):
        status, doc = await leader.api.request(
            "POST", "/v1/deployments?app=fuzz", data=raw, headers={"Content-Type": content_type}
        )
        _check(status, doc)
        assert status >= 400
    assert await _count(leader) == before


def _tar_with_dockerfile() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("Dockerfile")
        info.size = 13
        archive.addfile(info, io.BytesIO(b"FROM scratch\n"))
    return buffer.getvalue()


TAR = _tar_with_dockerfile()
HEADER_TEXT = st.characters(min_codepoint=32, max_codepoint=126)  # what HTTP clients can send


@FUZZ
@given(
    params=st.lists(
        st.tuples(st.sampled_from(KEYS) | st.text(max_size=10), st.text(max_size=30)), max_size=5
    )
)
async def test_any_query_parameters(leader: InProcessLeader, params: list[tuple[str, str]]) -> None:
    before = await _count(leader)
    status, doc = await leader.api.request(
        "POST",
        "/v1/deployments",
        params=params,
        data=TAR,
        headers={"Content-Type": "application/x-tar"},
    )
    _check(status, doc)
    if status >= 400:
        assert await _count(leader) == before


@FUZZ
@given(token=st.text(HEADER_TEXT, max_size=60), key=st.text(HEADER_TEXT, max_size=300))
async def test_any_headers(leader: InProcessLeader, token: str, key: str) -> None:
    async with leader.api.session.get(
        leader.api.base_url + "/v1/deployments", headers={"Authorization": token}
    ) as response:
        assert response.status == 401
    status, doc = await leader.api.request(
        "PUT", "/v1/registry", json={"server": "x"}, headers={"Idempotency-Key": key}
    )
    _check(status, doc)


@FUZZ
@given(messages=st.lists(json_values.map(str) | st.text(max_size=80), min_size=1, max_size=3))
async def test_rogue_worker_messages(leader_factory: Any, messages: list[str]) -> None:
    """Whatever a worker sends, the leader stays up and answers health checks."""
    leader = await _tls_leader(leader_factory)
    identity = await _enrol(leader)
    url = leader.url.replace("https", "wss") + "/v1/agent"
    async with leader.api.session.ws_connect(
        url,
        ssl=leader.api.ssl,
        headers={"Authorization": f"Node {identity['node_id']}:{identity['secret']}"},
    ) as ws:
        for message in messages:
            if ws.closed:
                break
            await ws.send_str(message)
        await ws.close()
    status, _ = await leader.api.request("GET", "/v1/cluster")
    assert status == 200


_leaders: dict[int, Any] = {}


async def _tls_leader(factory: Any) -> InProcessLeader:
    """One TLS leader per test run: hypothesis calls the test many times."""
    if id(factory) not in _leaders:
        _leaders.clear()
        _leaders[id(factory)] = await factory(leader={"plain_http": None})
    leader: InProcessLeader = _leaders[id(factory)]
    return leader


async def _enrol(leader: InProcessLeader) -> dict[str, str]:
    token = await leader.api.join_token()
    name = f"rogue-{await _count_nodes(leader)}"
    status, doc = await leader.api.request("POST", "/v1/join", json={"token": token, "name": name})
    assert status == 201, doc
    return dict(doc)


async def _count_nodes(leader: InProcessLeader) -> int:
    return len(await leader.api.nodes())
