"""Fast checks of the link's parts: join tokens, the leader CA, wire messages, backoff."""

from __future__ import annotations

import errno
import json
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from agent import wire
from agent.backoff import Backoff
from agent.leader.links.node_writer import NodeInfoWriter
from agent.leader.state.models import (
    CatchUp,
    Deployment,
    DeploymentRequest,
    LastPull,
    Mode,
    NodeRecord,
    State,
    caught_up_meanwhile,
)
from agent.leader.state.store import Store
from agent.tls import JoinTokenError, ensure_leader_tls, make_join_token, parse_join_token
from agent.worker.agent import OFFLINE_RETRY_CAP, _no_route


def test_join_token_round_trip_and_malformed_tokens() -> None:
    fingerprint = "ab" * 32
    assert parse_join_token(make_join_token(fingerprint, "s3cret")) == (fingerprint, "s3cret")
    for bad in ("", "DAT1-short-x", "XYZ1-" + "ab" * 32 + "-s", "DAT1-" + "zz" * 32 + "-s"):
        with pytest.raises(JoinTokenError):
            parse_join_token(bad)


def test_leader_ca_is_made_once_and_the_certificate_follows_new_names(tmp_path: Path) -> None:
    """The CA survives restarts (tokens stay valid); new names get a new server certificate."""
    first = ensure_leader_tls(tmp_path, ["leader.test", "127.0.0.1"])
    fingerprint = first.fingerprint()
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    again = ensure_leader_tls(tmp_path, ["leader.test", "10.9.8.7"])
    assert again.fingerprint() == fingerprint
    cert = x509.load_pem_x509_certificate(again.cert_file.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.9.8.7" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    context = ssl.create_default_context(cafile=str(again.ca_file))
    assert context.cert_store_stats()["x509_ca"] == 1
    again.server_context()  # the key matches the certificate


@pytest.mark.parametrize(
    "data",
    [
        "{",
        "[]",
        '{"v": 1}',
        '{"type": 7, "v": 1}',
        '{"type": "credentials_ack", "v": 1, "version": "one"}',
        '{"type": "credentials_ack", "v": 1}',
    ],
)
def test_bad_messages_do_not_decode(data: str) -> None:
    """Not JSON, no type, or a known type with a field missing or of the wrong type."""
    with pytest.raises(wire.BadMessage):
        wire.decode_for_leader(data)


def test_unknown_fields_of_known_messages_are_ignored_both_ways() -> None:
    """A newer peer's extra fields (and its newer `v`) do not stop a message from decoding."""
    ack = wire.decode_for_leader('{"type": "credentials_ack", "v": 3, "version": 1, "new": 1}')
    assert ack == wire.CredentialsAck(version=1, v=3)
    order = wire.decode_for_worker(
        '{"type": "retain", "v": 3, "app": "a", "keep": 2, "platform": {"os": "linux"}}'
    )
    assert order == wire.Retain(app="a", keep=2, v=3)


@pytest.mark.parametrize("decode", [wire.decode_for_leader, wire.decode_for_worker])
def test_an_unknown_message_type_is_told_apart_from_a_bad_message(
    decode: Callable[[str], object],
) -> None:
    """A well-formed message of a type this release does not know is UnknownMessage, so
    the link skips it instead of closing."""
    with pytest.raises(wire.UnknownMessage) as caught:
        decode('{"type": "launch_missiles", "v": 3, "target": "moon"}')
    assert caught.value.message_type == "launch_missiles"


def test_a_message_for_an_older_peer_leaves_out_what_it_does_not_know(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """encode_for writes a message as a peer of that version reads it: the fields and the
    message types added since are left out, and `v` says its version."""
    monkeypatch.setattr(
        wire, "ADDED_IN", {2: {"pull": frozenset({"image"}), "retain": frozenset()}}
    )
    creds = wire.WireCredentials(version=1)
    order = wire.PullOrder(order="d1", image="r@sha256:" + "0" * 64, credentials=creds)
    assert json.loads(wire.encode_for(order, 1) or "") == {
        "type": "pull",
        "v": 1,
        "order": "d1",
        "credentials": {"version": 1, "server": None, "username": None, "password": None},
    }
    assert wire.encode_for(wire.Retain(app="a", keep=1), 1) is None
    assert json.loads(wire.encode_for(order, 2) or "")["image"] == order.image


def test_messages_round_trip() -> None:
    message = wire.PullResult(order="d1", image="r/a@sha256:" + "0" * 64, ok=False, error="x")
    assert wire.decode_for_leader(wire.encode(message)) == message


def test_backoff_is_capped_and_never_spins() -> None:
    """Delays double from 0.5 s to the 30 s cap and never fall below half their ceiling."""
    backoff = Backoff(initial=0.5, cap=30)
    delays = [backoff.next() for _ in range(20)]
    assert all(0.25 <= d <= 30 for d in delays)
    assert all(d >= 15 for d in delays[7:])
    backoff.reset()
    assert backoff.next() <= 0.5


def test_backoff_keeps_drawing_at_its_cap_however_long_the_outage() -> None:
    """Thousands of failed tries later (hours at the cap) the delay is still the cap's."""
    backoff = Backoff(initial=0.25, cap=30)
    for _ in range(5000):
        delay = backoff.next()
    assert 15 <= delay <= 30
    backoff.reset()
    backoff.to_cap()
    assert backoff.next() >= 15


def test_a_connect_that_never_left_the_host_keeps_a_pace_of_seconds() -> None:
    """No route to the leader holds the worker's next try within 4 s however long the
    outage; a refused connect (the leader's host answered) backs off to the 30 s cap."""
    backoff = Backoff(initial=0.5, cap=30)
    for _ in range(10):
        backoff.next()
    no_route = OSError(errno.ENETUNREACH, "Network is unreachable")
    assert _no_route(no_route)
    assert not _no_route(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert all(2 <= backoff.next(OFFLINE_RETRY_CAP) <= 4 for _ in range(20))
    assert backoff.next() >= 15


async def test_node_info_reaches_the_store_at_the_flush_not_at_each_answer(
    tmp_path: Path,
) -> None:
    """A marked node is written only when flushed (here: on close); until then the hub
    reads its newer info from the writer."""
    store = Store(tmp_path / "leader.db")
    await store.open()
    try:
        node = NodeRecord(id="n-1", name="w1", enrolled_at=0.0)
        await store.add_node(node, "hash")
        writer = NodeInfoWriter(store)
        node.info.credentials_version = 7
        writer.mark(node)
        pending = writer.pending("n-1")
        assert pending is not None and pending.credentials_version == 7
        assert (await store.nodes())[0].info.credentials_version is None
        await writer.close()
        assert (await store.nodes())[0].info.credentials_version == 7
        assert writer.pending("n-1") is None
    finally:
        await store.close()


def _finished(dep_id: str, state: State, digest: str, nodes: dict[str, str]) -> Deployment:
    return Deployment(
        id=dep_id,
        app="app",
        state=state,
        mode=Mode.REGISTRY,
        request=DeploymentRequest(app="app"),
        source="upload",
        created_at=0.0,
        updated_at=0.0,
        repository="registry.test:5000/app",
        tag=dep_id,
        digest=digest,
        nodes={name: {"node_id": f"id-{name}", "status": s} for name, s in nodes.items()},
    )


async def test_a_catch_up_pull_marks_the_node_present_where_the_deployment_left_it_pending(
    tmp_path: Path,
) -> None:
    """Only a finished deployment of that very image, and only where the node was pending:
    a running deployment is its runner's to write, and a failure stays a failure."""
    store = Store(tmp_path / "leader.db")
    await store.open()
    new, old = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    deployments = [
        _finished("done", State.SUCCEEDED, new, {"w1": "present", "w2": "pending", "w3": "failed"}),
        _finished("older", State.SUCCEEDED, old, {"w2": "pending"}),
        _finished("running", State.RELEASING, new, {"w2": "pending"}),
    ]
    try:
        for dep in deployments:
            await store.create(dep, None)
        writer = NodeInfoWriter(store)
        image = f"registry.test:5000/app@{new}"
        for node in ("w2", "w3"):
            writer.caught_up(CatchUp(node, image, seconds=1.25, at=1000.0))
        await writer.close()
        done, older, running = [await store.get(dep.id) for dep in deployments]
        assert done is not None and older is not None and running is not None
        assert done.nodes["w2"] == {
            "node_id": "id-w2",
            "status": "present",
            "seconds": 1.25,
            "caught_up_at": 1000.0,
        }
        assert done.nodes["w1"]["status"] == "present"
        assert done.nodes["w3"]["status"] == "failed"
        assert older.nodes["w2"]["status"] == "pending"
        assert running.nodes["w2"]["status"] == "pending"
    finally:
        await store.close()


def test_nodes_that_caught_up_while_the_deployment_ran_are_marked_present_at_its_end() -> None:
    """A node pending in a running deployment that has since pulled its very image, and
    succeeded, is present when the deployment finishes; any other stays as it was."""
    digest = "sha256:" + "1" * 64
    image = f"registry.test:5000/app@{digest}"
    dep = _finished(
        "running", State.RELEASING, digest, {"w1": "pending", "w2": "pending", "w3": "pending"}
    )
    dep.nodes["w4"] = {"node_id": "id-w4", "status": "failed"}

    def node(name: str, pulled: str, ok: bool = True) -> NodeRecord:
        record = NodeRecord(id=f"id-{name}", name=name, enrolled_at=0.0)
        record.info.last_pull = LastPull(image=pulled, ok=ok, at=2000.0, seconds=0.5)
        return record

    nodes = [
        node("w1", image),
        node("w2", "registry.test:5000/app@sha256:" + "2" * 64),
        node("w3", image, ok=False),
        node("w4", image),
    ]

    assert caught_up_meanwhile(dep, nodes) == 1
    assert dep.nodes["w1"] == {
        "node_id": "id-w1",
        "status": "present",
        "seconds": 0.5,
        "caught_up_at": 2000.0,
    }
    assert [dep.nodes[n]["status"] for n in ("w2", "w3", "w4")] == ["pending", "pending", "failed"]
