"""Secrets at rest: what the leader's store files hold once a secret is superseded or used.

A superseded registry password is gone from the database and its WAL as soon as the
rotation returns; a git URL's credentials never reach the store at all, so a deployment
that still needs them after a restart fails with a hint to submit it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.credentials import RegistryCredentials
from agent.leader.state.models import Deployment, DeploymentRequest, GitSource, Mode
from agent.leader.state.scrub import scrub_git_userinfo
from agent.leader.state.store import Store
from tests.support.store_files import files_holding

OLD_PASSWORD = "old-registry-password-0f3a9c"
NEW_PASSWORD = "new-registry-password-7b21de"


def _creds(password: str) -> RegistryCredentials:
    return RegistryCredentials(server="registry.test", username="ci", password=password)


async def test_a_superseded_registry_password_is_gone_from_every_store_file(
    tmp_path: Path,
) -> None:
    """After a rotation returns, with the store still open (the leader running), `grep -a`
    finds the old password in neither leader.db nor leader.db-wal; the new one is kept."""
    db = tmp_path / "leader.db"
    store = Store(db)
    await store.open()
    try:
        await store.put_credentials(_creds(OLD_PASSWORD))
        await store.put_credentials(_creds(NEW_PASSWORD))
        assert files_holding(db, OLD_PASSWORD) == []
        assert files_holding(db, NEW_PASSWORD) != []
        await store.put_credentials(None)  # removed: no password anywhere
        assert files_holding(db, NEW_PASSWORD) == []
    finally:
        await store.close()


async def test_a_deployment_needing_git_credentials_after_a_restart_fails_with_a_hint(
    leader_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A git deployment submitted with credentials and not yet cloned when the leader
    stopped (its record marked `git_credentials`, the URL stored without them) fails at
    the next start with `source_unavailable` and the hint to submit it again."""
    state = tmp_path / "state"
    state.mkdir()
    store = Store(state / "leader.db")
    await store.open()
    now = time.time()
    dep = Deployment(
        id="20260101000000-0000beef",
        app="private",
        mode=Mode.LOCAL,
        request=DeploymentRequest(app="private", git=GitSource(url="http://git.test/repo")),
        source="git",
        created_at=now,
        updated_at=now,
        repository="private",
        tag="20260101000000-0000beef",
        git_credentials=True,
    )
    await store.create(dep, None)
    await store.close()

    leader = await leader_factory(state_dir=state, leader={"git_allowed_schemes": ["http"]})
    final = await leader.api.wait_final(dep.id)

    assert final["state"] == "failed", final
    assert final["error"]["code"] == "source_unavailable"
    assert "kept in memory only" in final["error"]["message"]
    assert "submit the deployment again" in final["error"]["hint"]
    assert final["source"]["url"] == "http://***@git.test/repo"


def test_stored_git_urls_of_an_earlier_release_are_scrubbed_of_credentials() -> None:
    """The migration's function: user and password go from a stored doc's git URL and
    the record is marked as needing them; other docs come back as they were."""
    doc: dict[str, Any] = {
        "id": "d1",
        "request": {"app": "a", "git": {"url": "https://u:s3cret@git.test/r.git", "ref": "main"}},
    }
    scrubbed = scrub_git_userinfo(doc)
    assert scrubbed["request"]["git"] == {"url": "https://git.test/r.git", "ref": "main"}
    assert scrubbed["git_credentials"] is True
    assert doc["request"]["git"]["url"] == "https://u:s3cret@git.test/r.git"  # not changed
    token_only = {"request": {"git": {"url": "https://TOKEN@git.test/r.git"}}}
    assert scrub_git_userinfo(token_only)["request"]["git"]["url"] == "https://git.test/r.git"
    clean_docs: list[dict[str, Any]] = [
        {"request": {"git": {"url": "https://git.test/r.git"}}},
        {"request": {}},
    ]
    for clean in clean_docs:
        assert scrub_git_userinfo(clean) is clean
