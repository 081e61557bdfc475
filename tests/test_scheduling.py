"""Scheduling: one deployment per app in order, cancel, idempotency, deadlines, git sources."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.leader.pipeline import sources, stages
from agent.leader.state.store import IDEMPOTENCY_TTL_S
from tests.support.canary import CANARY
from tests.support.contexts import busybox_context, run_step
from tests.support.dockerd import Dockerd
from tests.support.git_http import git_http
from tests.support.leader import InProcessLeader
from tests.support.store_files import files_holding


async def test_two_deployments_of_one_app_run_in_submission_order(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """The second deployment of an app starts building only after the first is final."""
    slow = busybox_context(tmp_path / "a", run_step("sleep 2"))
    first = await leader.api.deploy_dir(slow, "ordered")
    second = await leader.api.deploy_dir(busybox_context(tmp_path / "b"), "ordered")

    a = await leader.api.wait_final(first["id"])
    b = await leader.api.wait_final(second["id"])

    assert a["state"] == b["state"] == "succeeded"
    assert b["stages"]["building"]["started_at"] >= a["finished_at"]


async def test_different_apps_build_in_parallel(leader: InProcessLeader, tmp_path: Path) -> None:
    """Two apps' slow builds overlap in time when max_parallel_builds allows two."""
    context = busybox_context(tmp_path / "a", run_step("sleep 3"))
    one = await leader.api.deploy_dir(context, "par-one")
    two = await leader.api.deploy_dir(context, "par-two")

    a = await leader.api.wait_final(one["id"])
    b = await leader.api.wait_final(two["id"])

    assert b["stages"]["building"]["started_at"] < a["stages"]["building"]["finished_at"]


async def test_cancel_stops_the_build_in_flight(
    leader: InProcessLeader, dockerd: Dockerd, tmp_path: Path
) -> None:
    """Cancelling mid-build ends the deployment as cancelled within seconds, with no image."""
    context = busybox_context(tmp_path / "c", run_step("echo started; sleep 60"))
    dep = await leader.api.deploy_dir(context, "cancelme")
    await _wait_for_log(leader, dep["id"], "started")
    started = time.monotonic()

    status, doc = await leader.api.request("POST", f"/v1/deployments/{dep['id']}/cancel")

    assert status == 200, doc
    assert doc["state"] == "cancelled"
    assert doc["error"]["code"] == "cancelled"
    assert time.monotonic() - started < 10
    assert dockerd.cli("image", "inspect", f"cancelme:{dep['id']}", check=False).returncode != 0
    busy = dockerd.cli("ps", "-q", "--filter", "status=running").stdout.split()
    await asyncio.sleep(0)
    assert busy == [] or await _containers_gone(dockerd)


async def test_a_cancel_after_the_last_stage_leaves_the_deployment_succeeded(
    leader: InProcessLeader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel that arrives once every stage is done (here, while old images are
    pruned, after the final state) cannot undo the work: the deployment stays
    succeeded, as what runs is its image, and the cancel's answer says so."""
    pruning = asyncio.Event()

    async def slow_prune(ctx: object, dep: object) -> None:
        pruning.set()
        await asyncio.sleep(30)

    monkeypatch.setattr(stages, "retain", slow_prune)
    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c"), "latecancel")
    await asyncio.wait_for(pruning.wait(), 60)

    status, doc = await leader.api.request("POST", f"/v1/deployments/{dep['id']}/cancel")

    assert (status, doc["state"], doc.get("error")) == (200, "succeeded", None)


async def _containers_gone(dockerd: Dockerd) -> bool:
    for _ in range(50):
        if not dockerd.cli("ps", "-q", "--filter", "status=running").stdout.split():
            return True
        await asyncio.sleep(0.2)
    return False


async def _wait_for_log(leader: InProcessLeader, dep_id: str, text: str) -> None:
    async with asyncio.timeout(60):
        while True:
            assert leader.leader.ctx is not None
            docs = await leader.leader.ctx.store.events_after(dep_id, 0, 10_000)
            if any(text.encode() in d for d in docs):
                return
            await asyncio.sleep(0.1)


async def test_cancel_a_queued_deployment_never_runs_it(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """A deployment cancelled while queued behind another of its app never starts building."""
    first = await leader.api.deploy_dir(busybox_context(tmp_path / "a", run_step("sleep 2")), "q")
    second = await leader.api.deploy_dir(busybox_context(tmp_path / "b"), "q")

    status, doc = await leader.api.request("POST", f"/v1/deployments/{second['id']}/cancel")

    assert status == 200
    assert doc["state"] == "cancelled"
    await leader.api.wait_final(first["id"])
    final = await leader.api.wait_final(second["id"])
    assert final["state"] == "cancelled"
    assert final["stages"] == {}
    status, doc = await leader.api.request("POST", f"/v1/deployments/{second['id']}/cancel")
    assert status == 409


async def test_broken_dockerfile_fails_as_build_failed_with_the_log(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """A failing RUN step is build_failed, and the error carries the last log lines."""
    context = busybox_context(tmp_path / "c", run_step("echo about-to-fail; exit 3"))
    dep = await leader.api.deploy_dir(context, "broken")

    final = await leader.api.wait_final(dep["id"])

    assert final["state"] == "failed"
    assert final["error"]["code"] == "build_failed"
    assert "exit code: 3" in final["error"]["message"]
    assert any(line.endswith(" about-to-fail") for line in final["error"]["log_tail"])
    assert final["error"]["hint"]


async def test_idempotency_key_returns_the_same_deployment(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """The same Idempotency-Key and body give the same deployment (202 again, marked as a
    replay); another body is a 422."""
    context = busybox_context(tmp_path / "c")
    key = {"Idempotency-Key": "order-77"}
    s1, d1 = await leader.api.deploy_dir_raw(context, "idem", headers=key)
    s2, d2 = await leader.api.deploy_dir_raw(context, "idem", headers=key)
    replayed = leader.api.last_headers.get("Idempotent-Replayed")
    s3, _ = await leader.api.deploy_dir_raw(context, "other", headers=key)

    assert (s1, s2, s3) == (202, 202, 422)
    assert replayed == "true"
    assert d1["id"] == d2["id"]
    _, listing = await leader.api.request("GET", "/v1/deployments?app=idem")
    assert len(listing["deployments"]) == 1
    await leader.api.wait_final(d1["id"])


async def test_an_expired_idempotency_key_can_be_used_again(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """A key older than the retention window no longer binds: another body is accepted."""
    context = busybox_context(tmp_path / "c")
    key = {"Idempotency-Key": "order-78"}
    s1, d1 = await leader.api.deploy_dir_raw(context, "idem", headers=key)
    await leader.api.wait_final(d1["id"])
    aged = time.time() - IDEMPOTENCY_TTL_S - 60
    with sqlite3.connect(leader.config.state_path / "leader.db") as db:
        db.execute("UPDATE idempotency SET created_at = ? WHERE key = ?", (aged, "order-78"))

    s2, d2 = await leader.api.deploy_dir_raw(context, "other", headers=key)

    assert (s1, s2) == (202, 202)
    assert d2["id"] != d1["id"]
    await leader.api.wait_final(d2["id"])


async def test_stage_past_its_deadline_fails_with_timeout(
    leader_factory: object, tmp_path: Path
) -> None:
    """A build longer than stage_timeouts.building fails with code timeout."""
    leader = await leader_factory(leader={"stage_timeouts": {"building": 2}})  # type: ignore[operator]
    dep = await leader.api.deploy_dir(busybox_context(tmp_path / "c", run_step("sleep 30")), "slow")

    final = await leader.api.wait_final(dep["id"])

    assert final["error"]["code"] == "timeout"
    assert "building" in final["error"]["message"]


def _git_repo(path: Path) -> str:
    busybox_context(path, run_step("echo from-git"))
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "HOME": str(path.parent),
        "PATH": "/usr/bin:/bin",
    }
    for cmd in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-qm", "app"]):
        subprocess.run(["git", "-C", str(path), *cmd], check=True, env=env)
    return f"file://{path}"


async def test_git_source_is_cloned_and_built(leader: InProcessLeader, tmp_path: Path) -> None:
    """A deployment from a git URL and ref builds that commit's tree."""
    url = _git_repo(tmp_path / "repo")
    status, dep = await leader.api.request(
        "POST", "/v1/deployments", json={"app": "fromgit", "git": {"url": url, "ref": "main"}}
    )
    assert status == 202, dep

    final = await leader.api.wait_final(dep["id"])
    events = await leader.api.events(dep["id"])

    assert final["state"] == "succeeded", final
    assert final["source"] == {"type": "git", "url": url, "ref": "main"}
    assert any(e["type"] == "log" and e["line"] == "from-git" for e in events)
    assert any(e["type"] == "source" and len(e.get("commit", "")) == 40 for e in events)


async def test_unknown_git_ref_is_source_unavailable(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """A ref the repository lacks fails as source_unavailable with git's reason."""
    url = _git_repo(tmp_path / "repo")
    _, dep = await leader.api.request(
        "POST", "/v1/deployments", json={"app": "badref", "git": {"url": url, "ref": "nope"}}
    )

    final = await leader.api.wait_final(dep["id"])

    assert final["error"]["code"] == "source_unavailable"
    assert "nope" in final["error"]["message"]


def _git_repo_with(path: Path, size: int) -> str:
    """_git_repo, with a file of `size` random bytes committed too."""
    url = _git_repo(path)
    (path / "blob").write_bytes(os.urandom(size))
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env |= {"GIT_COMMITTER_EMAIL": "t@t", "HOME": str(path.parent), "PATH": "/usr/bin:/bin"}
    for cmd in (["add", "blob"], ["commit", "-qm", "blob"]):
        subprocess.run(["git", "-C", str(path), *cmd], check=True, env=env)
    return url


async def test_a_repository_past_the_context_limit_stops_being_packed_there(
    leader_factory: Any, tmp_path: Path
) -> None:
    """The packing of a clone counts its files: past max_context_bytes it stops, instead
    of writing the whole tree out once more before the check refuses it."""
    url = _git_repo_with(tmp_path / "repo", 3 * 2**20)
    leader = await leader_factory(leader={"max_context_bytes": 2**20})
    _, dep = await leader.api.request(
        "POST", "/v1/deployments", json={"app": "huge", "git": {"url": url, "ref": "main"}}
    )

    final = await leader.api.wait_final(dep["id"])

    assert final["error"]["code"] == "source_unavailable"
    assert "repository's files pass the build context limit of 1048576" in final["error"]["message"]


async def test_a_clone_that_would_fill_the_disk_is_stopped(
    leader_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The room an upload must leave free holds for a clone too: with the reserve set
    8 MiB under what is free, a 24 MiB repository's clone is killed under way."""
    url = _git_repo_with(tmp_path / "repo", 24 * 2**20)
    leader = await leader_factory()
    free = shutil.disk_usage(leader.config.state_dir).free
    monkeypatch.setattr(sources, "DISK_RESERVE_BYTES", free - 8 * 2**20)
    monkeypatch.setattr(sources, "ROOM_CHECK_S", 0.01)
    _, dep = await leader.api.request(
        "POST", "/v1/deployments", json={"app": "filling", "git": {"url": url, "ref": "main"}}
    )

    final = await leader.api.wait_final(dep["id"])

    assert final["error"]["code"] == "source_unavailable", final
    assert "the clone was stopped with" in final["error"]["message"]
    assert not list(Path(leader.config.state_dir, "contexts").iterdir())


GIT_TOKEN = f"canary-git-token-{CANARY.marker}"
# (user, password) the git server expects, and the URL's credentials part
GIT_CREDENTIALS = {
    "token-as-user": ((GIT_TOKEN, ""), f"{GIT_TOKEN}@"),
    "user-and-token": (("deploy", GIT_TOKEN), f"deploy:{GIT_TOKEN}@"),
}


@pytest.mark.parametrize("case", GIT_CREDENTIALS.keys())
async def test_a_git_token_in_the_url_reaches_git_alone(
    leader_factory: Any, tmp_path: Path, case: str
) -> None:
    """A private repository's token in the URL, as the user name or as the password:
    git authenticates with it against a real git server, and the deployment, its events
    and the leader's log show none of it (git is given the URL without credentials)."""
    CANARY.issue(GIT_TOKEN)
    (user, password), userinfo = GIT_CREDENTIALS[case]
    _git_repo(tmp_path / "repos" / "repo")
    leader: InProcessLeader = await leader_factory(leader={"git_allowed_schemes": ["http"]})
    async for base, server in git_http(tmp_path / "repos", user, password):
        host = base.removeprefix("http://")
        url = f"http://{userinfo}{host}/repo"
        with capture_logs() as logs:
            status, dep = await leader.api.request(
                "POST",
                "/v1/deployments",
                json={"app": "private", "git": {"url": url, "ref": "main"}},
            )
            assert status == 202, dep
            final = await leader.api.wait_final(dep["id"])
            events = await leader.api.events(dep["id"])

        assert final["state"] == "succeeded", final
        assert server.served > 0
        assert final["source"]["url"] == f"http://***@{host}/repo"
        assert GIT_TOKEN not in json.dumps([dep, final, events]) + repr(logs)
        assert files_holding(Path(leader.config.state_dir) / "leader.db", GIT_TOKEN) == []
