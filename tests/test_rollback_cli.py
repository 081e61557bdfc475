"""`deploy-agent apps`, `history`, `rollback` and `deploy --prebuilt`, run as the
installed script against a real leader (local mode), and the pieces their tables are
made of."""

from __future__ import annotations

import re
from pathlib import Path

from agent.cli.releases import history_table, retained_where, short_digest
from tests.support.contexts import busybox_context
from tests.support.dockerd import Dockerd
from tests.support.leader import InProcessLeader
from tests.test_cli import _cli


async def _built(leader: InProcessLeader, ctx: Path, app: str) -> str:
    dep = await leader.api.deploy_dir(ctx, app)
    final = await leader.api.wait_final(dep["id"])
    assert final["state"] == "succeeded", final
    return str(final["id"])


async def test_history_and_rollback_from_the_shell(
    leader: InProcessLeader, dockerd: Dockerd, tmp_path: Path
) -> None:
    """`history` marks the current release and says where each image is; `rollback`
    follows the rollback to its end and exits 0; `apps` then shows it as current. A
    rollback to an image that is gone exits 1 with image_gone; one with nothing to go
    back to exits 1 with the leader's reason."""
    v1 = await _built(leader, busybox_context(tmp_path / "a"), "shell")
    v2 = await _built(leader, busybox_context(tmp_path / "b", cmd="echo 2"), "shell")

    code, out, _ = await _cli(leader, "history", "shell")
    assert code == 0
    header, first, second = out.splitlines()
    assert header.split() == ["ID", "WHEN", "KIND", "IMAGE", "DIGEST", "RETAINED"]
    assert first.startswith("*") and v2 in first and first.endswith("leader")
    assert second.startswith(" ") and v1 in second and f"shell:{v1}" in second

    code, out, err = await _cli(leader, "rollback", "shell")
    assert code == 0, err
    assert re.search(r"deployment \S+ submitted \(rollback, local mode\)", err), err
    assert re.search(r"deployment \S+: succeeded", out), out
    code, out, _ = await _cli(leader, "apps")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("shell "))
    assert "rollback" in row and f"shell:{v1}" in row

    # one rollback whatever the body's spelling: no body, {} and { } are one request
    key = {"Idempotency-Key": "shell-back-to-v2"}
    path = "/v1/apps/shell/rollback"
    status, first = await leader.api.request("POST", path, headers=key)
    assert status == 202, first
    for body in (b"{}", b"{ }"):
        json_key = {**key, "Content-Type": "application/json"}
        status, again = await leader.api.request("POST", path, data=body, headers=json_key)
        assert (status, again["id"]) == (202, first["id"]), again
    assert (await leader.api.wait_final(first["id"]))["state"] == "succeeded"

    dockerd.cli("image", "rm", "-f", f"shell:{v2}")
    code, out, _ = await _cli(leader, "rollback", "shell", "--to", v2)
    assert code == 1
    assert "image_gone" in out
    code, _, err = await _cli(leader, "rollback", "nothing-here")
    assert code == 1
    assert "no app nothing-here" in err


async def test_deploy_prebuilt_from_the_shell(
    leader: InProcessLeader, dockerd: Dockerd, tmp_path: Path
) -> None:
    """`deploy --prebuilt` deploys an image of the leader's engine and exits 0; one the
    engine lacks is refused before anything runs, exit 1."""
    dockerd.cli("build", "-q", "-t", "handmade:7", str(busybox_context(tmp_path / "c")))

    code, out, err = await _cli(leader, "deploy", "--app", "handmade", "--prebuilt", "handmade:7")
    assert code == 0, err
    assert "prebuilt, local mode" in err
    assert re.search(r"deployment \S+: succeeded", out), out
    code, _, err = await _cli(leader, "deploy", "--app", "handmade", "--prebuilt", "handmade:8")
    assert code == 1
    assert "holds no image handmade:8" in err

    # a bare name is the engine's :latest, and is recorded as that
    dockerd.cli("tag", "handmade:7", "handmade:latest")
    status, dep = await leader.api.request(
        "POST", "/v1/deployments", json={"app": "handmade", "prebuilt": "handmade"}
    )
    assert status == 202, dep
    final = await leader.api.wait_final(dep["id"])
    assert (final["state"], final["image"]) == ("succeeded", "handmade:latest"), final


def test_the_history_table_marks_the_current_release_and_where_each_image_is() -> None:
    """Columns line up; a digest shows 12 hex digits; places that hold the image are
    named, "gone" when every place that answered lost it, "?" when none could tell."""
    digest = "sha256:" + "ab" * 32
    releases = [
        {
            "id": "r2",
            "current": True,
            "created_at": 0.0,
            "finished_at": 60.0,
            "kind": "rollback",
            "rollback_of": "r1",
            "image": f"reg:5000/ns/app@{digest}",
            "digest": digest,
            "retained": {"leader": False, "workers": {"w2": True, "w1": None}, "registry": True},
        },
        {
            "id": "r1",
            "current": False,
            "created_at": 0.0,
            "kind": "build",
            "image": "app:r1",
            "digest": None,
            "retained": {"leader": False, "workers": {}, "registry": None},
        },
    ]

    lines = history_table(releases)

    assert lines[0].index("ID") == lines[1].index("r2") == lines[2].index("r1")
    assert "rollback to r1" in lines[1] and "reg:5000/ns/app " in lines[1]
    assert lines[1].endswith("w2, registry")
    assert short_digest(digest) == "ab" * 6
    assert lines[2].endswith("gone")
    assert retained_where({"leader": None, "workers": {"w": None}, "registry": None}) == "?"
