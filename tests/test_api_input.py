"""Bad input: every case is a 4xx with a JSON error body, and nothing changes."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.leader.pipeline import sources
from tests.support.api import tar_of
from tests.support.contexts import busybox_context
from tests.support.leader import InProcessLeader

GZ = {"Content-Type": "application/gzip"}
TAR = {"Content-Type": "application/x-tar"}


def _tar(*members: tarfile.TarInfo, dockerfile: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        if dockerfile:
            body = b"FROM scratch\n"
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))
        for member in members:
            archive.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return buffer.getvalue()


def _file(name: str, size: int = 1) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


UPLOAD = "/v1/deployments?app=ok"
CASES: dict[str, tuple[int, str, str, dict[str, Any]]] = {
    "malformed json": (400, "POST", "/v1/deployments", {"data": b"{", "headers": {"Content-Type": "application/json"}}),
    "wrong type": (400, "POST", "/v1/deployments", {"json": {"app": 5, "git": {"url": "https://h/r"}}}),
    "unknown field": (400, "POST", "/v1/deployments", {"json": {"app": "a", "git": {"url": "https://h/r"}, "colour": "red"}}),
    "bad app name": (400, "POST", "/v1/deployments", {"json": {"app": "Bad_App", "git": {"url": "https://h/r"}}}),
    "bad image": (400, "POST", "/v1/deployments", {"json": {"app": "a", "git": {"url": "https://h/r"}, "image": "UP/Case:tag"}}),
    "no source": (400, "POST", "/v1/deployments", {"json": {"app": "a"}}),
    "git url with a query": (400, "POST", "/v1/deployments", {"json": {"app": "a", "git": {"url": "https://h/r.git?access_token=T"}}}),
    "git url with a nul": (400, "POST", "/v1/deployments", {"json": {"app": "a", "git": {"url": "https://h/r\u0000x"}}}),
    "git url with a space": (400, "POST", "/v1/deployments", {"json": {"app": "a", "git": {"url": " https://h/r"}}}),
    "symlink through a symlink": (400, "POST", UPLOAD, {"data": _tar(_link("a/b", ".."), _link("x", "a/b/..")), "headers": TAR}),
    "bad git scheme": (400, "POST", "/v1/deployments", {"json": {"app": "a", "git": {"url": "ext::sh -c id"}}}),
    "option as ref": (400, "POST", "/v1/deployments", {"json": {"app": "a", "git": {"url": "https://h/r", "ref": "--upload-pack=x"}}}),
    "dockerfile escapes": (400, "POST", "/v1/deployments", {"json": {"app": "a", "git": {"url": "https://h/r"}, "dockerfile": "../x"}}),
    "bad build arg": (400, "POST", "/v1/deployments", {"json": {"app": "a", "git": {"url": "https://h/r"}, "build_args": {"1x": "v"}}}),
    "unknown query": (400, "POST", UPLOAD + "&colour=red", {"data": _tar(), "headers": TAR}),
    "pair without =": (400, "POST", UPLOAD + "&build_arg=NOVALUE", {"data": _tar(), "headers": TAR}),
    "content type": (415, "POST", UPLOAD, {"data": b"x", "headers": {"Content-Type": "text/plain"}}),
    "empty body": (400, "POST", UPLOAD, {"data": b"", "headers": TAR}),
    "absolute path": (400, "POST", UPLOAD, {"data": _tar(_file("/etc/passwd")), "headers": TAR}),
    "dot-dot path": (400, "POST", UPLOAD, {"data": _tar(_file("a/../../x")), "headers": TAR}),
    "symlink out": (400, "POST", UPLOAD, {"data": _tar(_link("s", "../../etc")), "headers": TAR}),
    "absolute symlink": (400, "POST", UPLOAD, {"data": _tar(_link("s", "/etc/shadow")), "headers": TAR}),
    "hardlink out": (400, "POST", UPLOAD, {"data": _tar(_link("h", "../x", tarfile.LNKTYPE)), "headers": TAR}),
    "device file": (400, "POST", UPLOAD, {"data": _tar(_device("dev")), "headers": TAR}),
    "no dockerfile": (400, "POST", UPLOAD, {"data": _tar(_file("a"), dockerfile=False), "headers": TAR}),
    "truncated gzip": (400, "POST", UPLOAD, {"data": gzip.compress(_tar(_file("a", 5000)))[:-200], "headers": GZ}),
    "not an archive": (400, "POST", UPLOAD, {"data": b"hello world" * 100, "headers": TAR}),
    "bad state filter": (400, "GET", "/v1/deployments?state=bogus", {}),
    "bad limit": (400, "GET", "/v1/deployments?limit=abc", {}),
    "unknown deployment": (404, "GET", "/v1/deployments/nope", {}),
    "cancel unknown": (404, "POST", "/v1/deployments/nope/cancel", {}),
    "unknown route": (404, "GET", "/v1/nothing", {}),
    "wrong method": (405, "PATCH", "/v1/deployments", {}),
    "registry malformed": (400, "PUT", "/v1/registry", {"data": b"[", "headers": {"Content-Type": "application/json"}}),
    "registry unknown field": (400, "PUT", "/v1/registry", {"json": {"server": "h", "username": "u", "password": "p", "x": 1}}),
    "registry bad server": (400, "PUT", "/v1/registry", {"json": {"server": "h h", "username": "u", "password": "p"}}),
    "idempotency key too long": (400, "POST", "/v1/deployments", {"json": {"app": "a", "git": {"url": "https://h/r"}}, "headers": {"Idempotency-Key": "k" * 300}}),
}  # fmt: skip


async def _snapshot(leader: InProcessLeader) -> tuple[Any, Any, list[str]]:
    _, deployments = await leader.api.request("GET", "/v1/deployments")
    _, registry = await leader.api.request("GET", "/v1/registry")
    assert leader.leader.ctx is not None
    files = sorted(p.name for p in leader.leader.ctx.contexts_dir.iterdir())
    return deployments, registry, files


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_input_is_a_clear_4xx_and_changes_nothing(
    leader: InProcessLeader, case: str
) -> None:
    """Each kind of bad input answers its 4xx with {error: {code, message}}; state is unchanged."""
    status, method, path, kwargs = CASES[case]
    before = await _snapshot(leader)

    got, doc = await leader.api.request(method, path, **kwargs)

    assert got == status, doc
    assert set(doc["error"]) >= {"code", "message"}
    assert doc["error"]["message"]
    assert await _snapshot(leader) == before


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic dXNlcjpwYXNz"}],
)
async def test_requests_without_the_api_token_are_401(
    leader: InProcessLeader, headers: dict[str, str]
) -> None:
    """Anything but the right bearer token is a 401 with a JSON error, on every API route."""
    for method, path in (
        ("GET", "/v1/deployments"),
        ("GET", "/v1/registry"),
        ("GET", "/v1/cluster"),
    ):
        async with leader.api.session.request(
            method, leader.api.base_url + path, headers=headers
        ) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "unauthorized"


async def test_health_check_needs_no_token(leader: InProcessLeader) -> None:
    """/healthz answers without a token, so probes need no secret."""
    async with leader.api.session.get(leader.api.base_url + "/healthz") as response:
        assert response.status == 200


async def test_upload_larger_than_the_limit_is_413(
    leader_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A context over max_context_bytes is refused with 413 and leaves no file behind."""
    leader = await leader_factory(leader={"max_context_bytes": 100_000})
    body = tar_of(busybox_context(tmp_path / "c"), gzip=False)
    before = await _snapshot(leader)

    status, doc = await leader.api.request("POST", UPLOAD, data=body, headers=TAR)

    assert status == 413
    assert "100000" in doc["error"]["message"]
    assert await _snapshot(leader) == before


async def test_tar_bomb_past_the_unpacked_limit_is_413(
    leader_factory: Callable[..., Any],
) -> None:
    """A small gzip that unpacks past four times the limit is refused with 413."""
    leader = await leader_factory(leader={"max_context_bytes": 100_000})
    bomb = gzip.compress(_tar(_file("zeros", 1_000_000)))
    assert len(bomb) < 100_000

    status, _ = await leader.api.request("POST", UPLOAD, data=bomb, headers=GZ)

    assert status == 413


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB filesystem of its own (tmpfs), for a state directory that fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def _incompressible(size: int) -> AsyncIterator[bytes]:
    """A tar stream sent chunked (no Content-Length) of `size` random bytes."""
    for _ in range(size // 2**20):
        yield os.urandom(2**20)


@pytest.mark.parametrize("length_known", [True, False], ids=["content-length", "chunked"])
async def test_an_upload_that_would_fill_the_disk_is_507_and_leaves_nothing(
    leader_factory: Callable[..., Any],
    small_disk: Path,
    monkeypatch: pytest.MonkeyPatch,
    length_known: bool,
) -> None:
    """With 16 MiB to stay free, a 40 MiB upload to a 48 MiB filesystem is refused: at
    once when its length is announced, else once the free space runs low. No partial
    file stays behind, and a small upload still goes through."""
    monkeypatch.setattr(sources, "DISK_RESERVE_BYTES", 16 * 2**20)
    leader = await leader_factory(state_dir=small_disk / "state")
    before = await _snapshot(leader)
    size = 40 * 2**20
    body = os.urandom(size) if length_known else _incompressible(size)

    status, doc = await leader.api.request("POST", UPLOAD, data=body, headers=TAR)

    assert status == 507, doc
    assert doc["error"]["code"] == "insufficient_storage"
    assert "16 MiB must stay free" in doc["error"]["message"]
    assert await _snapshot(leader) == before
    assert shutil.disk_usage(small_disk).free > 40 * 2**20
    small = tar_of(busybox_context(small_disk / "c"))
    status, doc = await leader.api.request("POST", UPLOAD, data=small, headers=GZ)
    assert status == 202, doc
    assert (await leader.api.wait_final(doc["id"]))["state"] == "succeeded"


@pytest.mark.parametrize(
    ("path", "header"),
    [("/v1/cluster", b"Bearer \xff\xfe"), ("/v1/agent", b"Node n-1:\xff\xfe")],
    ids=["api-token", "node-secret"],
)
async def test_an_authorization_header_with_stray_bytes_is_401_not_500(
    leader: InProcessLeader, path: str, header: bytes
) -> None:
    """A header that is not UTF-8 is a wrong credential like any other."""
    host, _, port = leader.config.leader.listen.rpartition(":")  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: leader\r\nConnection: close\r\n"
        b"Authorization: " + header + b"\r\n\r\n"
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status_line.split()[1] == b"401", status_line


async def test_an_upload_whose_services_pass_8_kib_of_query_is_taken(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """An upload's fields are query parameters; 20 services with their environments make
    a request line of about 30 KB, past aiohttp's default 8,190 bytes, and are accepted."""
    env = {f"SETTING_{i}": "x" * 64 for i in range(20)}
    services = [{"name": f"svc{i}", "env": env} for i in range(20)]
    wide = json.dumps(services)
    assert len(wide) > 20_000

    context = busybox_context(tmp_path / "c")
    status, doc = await leader.api.deploy_dir_raw(context, "wide", None, services=wide)

    assert status == 202, doc
    assert doc["services"] == [f"svc{i}" for i in range(20)]
    await leader.api.request("POST", f"/v1/deployments/{doc['id']}/cancel")
    await leader.api.wait_final(doc["id"])


async def _raw_request(leader: InProcessLeader, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send `request` as bytes on a connection of its own; the status and the JSON body."""
    host, _, port = leader.config.leader.listen.rpartition(":")  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head, head
    return int(head.split()[1]), json.loads(body)


MALFORMED = {
    "request-line-over-128-kib": b"GET /v1/deployments?q=" + b"SECRETISH" * 15_000 + b" HTTP/1.1"
    b"\r\nHost: leader\r\n\r\n",
    "header-over-8-kib": b"GET /v1/deployments HTTP/1.1\r\nHost: leader\r\nX-Note: "
    + b"SECRETISH" * 1_000
    + b"\r\n\r\n",
    "header-without-colon": b"GET /v1/deployments HTTP/1.1\r\nHost: leader\r\nSECRETISH\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_request_is_a_json_400_logged_without_its_content(
    leader: InProcessLeader, request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A request that fails before any route (aiohttp's parser refuses it) is answered as
    every refusal is, and logged as one warning that quotes none of the request."""
    with capture_logs() as logs:
        status, body = await _raw_request(leader, request_bytes)

    assert status == 400
    assert body["error"]["code"] == "invalid_request"
    assert "SECRETISH" not in json.dumps(body)
    refused = [e for e in logs if e["event"] == "http.bad_request"]
    assert [e["log_level"] for e in refused] == ["warning"], logs
    assert "SECRETISH" not in repr(logs)
    assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_a_tls_handshake_sent_to_a_plain_leader_is_refused_quietly(
    leader: InProcessLeader,
) -> None:
    """A client speaking TLS to a plain-HTTP leader (or a scanner's probe) is answered
    with the JSON 400 too, and logged at debug only: an open port sees it often."""
    client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n"
    with capture_logs() as logs:
        status, body = await _raw_request(leader, client_hello)

    assert (status, body["error"]["code"]) == (400, "invalid_request")
    refused = [e for e in logs if e["event"] == "http.bad_request"]
    assert [(e["log_level"], e["reason"]) for e in refused] == [("debug", "BadHttpMethod")]


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        (
            {"json": {"app": "My_App", "git": {"url": "https://h/r"}}},
            "invalid deployment: app: must be an app name: 1 to 63 lowercase letters",
        ),
        (
            {
                "params": {"app": "My_App"},
                "data": b"",
                "headers": {"Content-Type": "application/x-tar"},
            },
            "invalid deployment: app: must be an app name",
        ),
        (
            {"json": {"app": "a", "git": {"url": "https://h/r"}, "colour": "red"}},
            "invalid deployment: unknown key `colour`",
        ),
        (
            {
                "json": {
                    "app": "a",
                    "git": {"url": "https://h/r"},
                    "services": [{"name": "w", "replicas": "2"}],
                }
            },
            "invalid deployment: services[0].replicas: must be a whole number, not text ('2')",
        ),
    ],
)
async def test_an_invalid_field_is_named_in_the_apis_words(
    leader: InProcessLeader, kwargs: dict[str, Any], says: str
) -> None:
    """A 400 names the field and what it must be, not msgspec's wording of its schema."""
    got, doc = await leader.api.request("POST", "/v1/deployments", **kwargs)
    assert got == 400, doc
    message = doc["error"]["message"]
    assert message.startswith(says), message
    assert "Expected" not in message and "$." not in message and "regex" not in message


async def test_an_invalid_value_among_secrets_quotes_none_of_them(leader: InProcessLeader) -> None:
    """A wrong value in a service's env map, or a build argument, is named by its place
    alone: the 400 quotes no value of the map (an env map holds passwords)."""
    secret = "postgres://app:s3cret-in-env@db/app"
    bodies: list[dict[str, Any]] = [
        {"services": [{"name": "w", "env": {"DATABASE_URL": secret, "PORT": 8080}}]},
        {"build_args": {"TOKEN": secret, "N": 1}},
        {"services": [{"name": "w", "env": [secret]}]},
    ]
    for extra in bodies:
        body = {"app": "a", "git": {"url": "https://h/r"}, **extra}
        got, doc = await leader.api.request("POST", "/v1/deployments", json=body)
        assert got == 400, doc
        message = doc["error"]["message"]
        assert "must be" in message and "s3cret" not in message, message
