"""Fast checks of pure logic: references, error classification, log redaction."""

from __future__ import annotations

import gc
import json
import sys
import time
import weakref
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import structlog
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from tenacity import AsyncRetrying, RetryCallState, stop_after_attempt

from agent import logs
from agent.credentials import RegistryCredentials
from agent.engine import classify_registry_error
from agent.errors import RegistryAuthError, RegistryError, RegistryTransientError, RequestError
from agent.leader.metrics import PULL_BUCKETS, LoopHistogram
from agent.leader.pipeline import stages
from agent.leader.pipeline.context import LeaderContext
from agent.leader.pipeline.release import may_lack_image, service_spec
from agent.leader.pipeline.sources import _git_env
from agent.leader.registry.references import image_host, push_name, registry_host, repository_for
from agent.leader.state.models import Deployment, DeploymentRequest, Mode, ServiceSpec
from agent.retention import created_ns
from agent.retrying import scoped
from agent.urls import redact_url, without_userinfo


@pytest.mark.parametrize(
    ("server", "host"),
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("ghcr.io", "ghcr.io"),
        ("https://registry.gitlab.com", "registry.gitlab.com"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        (
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
        ),
    ],
)
def test_registry_host_knows_docker_hub_aliases(server: str, host: str) -> None:
    assert registry_host(server) == host


@pytest.mark.parametrize(
    ("repository", "host"),
    [
        ("acme/app", "docker.io"),
        ("ghcr.io/acme/app", "ghcr.io"),
        ("localhost:5000/a", "localhost:5000"),
    ],
)
def test_image_host(repository: str, host: str) -> None:
    assert image_host(repository) == host


def test_default_repository_uses_namespace_or_username() -> None:
    hub = RegistryCredentials("https://index.docker.io/v1/", "Alice", "pw")
    assert repository_for("web", None, hub) == "docker.io/alice/web"
    ghcr = RegistryCredentials("ghcr.io", "bot", "pw", namespace="acme")
    assert repository_for("web", None, ghcr) == "ghcr.io/acme/web"
    assert repository_for("web", "acme/web", hub) == "docker.io/acme/web"


def test_image_outside_the_registry_is_refused() -> None:
    creds = RegistryCredentials("ghcr.io", "bot", "pw")
    with pytest.raises(RequestError) as caught:
        repository_for("web", "registry.gitlab.com/acme/web", creds)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("message", "kind", "unreachable"),
    [
        ("unauthorized: authentication required", RegistryAuthError, None),
        ("denied: requested access to the resource is denied", RegistryAuthError, None),
        (
            "login attempt to http://r/v2/ failed with status: 401 Unauthorized",
            RegistryAuthError,
            None,
        ),
        (
            'Get "http://r/v2/": dial tcp 127.0.0.1:5: connect: connection refused',
            RegistryTransientError,
            True,
        ),
        ("received unexpected HTTP status: 503 Service Unavailable", RegistryTransientError, False),
        ("toomanyrequests: rate limit", RegistryTransientError, False),
        ("received unexpected HTTP status: 502", RegistryTransientError, False),
        ('Put "https://r/v2/web/blobs/uploads/x": EOF', RegistryTransientError, True),
        ("unexpected EOF", RegistryTransientError, True),
        ("unknown: 500 Internal Server Error", RegistryTransientError, False),
        (
            'Get "https://10.213.188.10:44297/v2/": dial tcp 10.213.188.10:44297: '
            "connect: connection refused",
            RegistryTransientError,
            True,
        ),
        (
            'Get "https://10.5.0.7:5003/v2/": dial tcp 10.5.0.7:5003: connect: no route to host',
            RegistryTransientError,
            True,
        ),
        (
            "read tcp 1.2.3.4:5->6.7.8.9:443: read: connection reset by peer",
            RegistryTransientError,
            True,
        ),
    ],
)
def test_registry_errors_are_classified(message: str, kind: type, unreachable: bool | None) -> None:
    error = classify_registry_error(message)
    assert type(error) is kind
    if unreachable is not None:
        assert isinstance(error, RegistryTransientError) and error.unreachable is unreachable


@pytest.mark.parametrize(
    "message",
    ["manifest invalid: something odd", "name unknown: repository name not known: geofence"],
)
def test_unknown_registry_error_is_final(message: str) -> None:
    error = classify_registry_error(message)
    assert not isinstance(error, RegistryAuthError | RegistryTransientError)


@pytest.mark.parametrize(
    ("message", "repository", "kind"),
    [
        (
            "name unknown: repository name not known to registry: acme/timeout-svc",
            "10.0.0.1:5000/acme/timeout-svc",
            RegistryError,
        ),
        (
            'Put "https://10.0.0.1:5000/v2/acme/timeout-svc/manifests/7": manifest invalid',
            "10.0.0.1:5000/acme/timeout-svc",
            RegistryError,
        ),
        ("manifest unknown: acme/denied", "r.io/acme/denied", RegistryError),
        ("unknown: repository eof-app not found", "localhost:5000/eof-app", RegistryError),
        (
            "denied: requested access to the resource is denied",
            "r.io/acme/denied",
            RegistryAuthError,
        ),
        (
            'Get "https://10.0.0.1:5000/v2/": dial tcp 10.0.0.1:5000: connect: connection refused',
            "10.0.0.1:5000/acme/eof",
            RegistryTransientError,
        ),
    ],
)
def test_a_marker_inside_the_repository_name_says_nothing(
    message: str, repository: str, kind: type
) -> None:
    """A repository named after a marker ("timeout-svc", "acme/denied") is blanked out
    before the markers are looked for; the registry's own words still count."""
    assert type(classify_registry_error(message, repository)) is kind


def test_redactor_scrubs_secrets_from_rendered_events_and_tracebacks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A registered secret is replaced in messages, nested values and exception text;
    a traceback shows no frame's local variables (they may hold secrets never
    registered)."""
    logs.configure("info", "json")
    secret = "s3cr3t-value-for-redaction"
    logs.redactor.add(secret)
    log = structlog.stdlib.get_logger("test")

    def fail() -> None:
        unregistered = "local-value-never-registered"
        raise ValueError(f"boom with {secret} after {len(unregistered)}")

    try:
        fail()
    except ValueError:
        log.exception("failed", detail={"nested": [secret]}, password="plain")
    out = capsys.readouterr().out
    assert secret not in out
    assert "local-value-never-registered" not in out
    event = json.loads(out.strip().splitlines()[-1])
    assert event["password"] == "***"
    assert event["detail"] == {"nested": ["***"]}
    frames = [frame for exc in event["exception"] for frame in exc["frames"]]
    assert [frame["name"] for frame in frames][-1] == "fail"
    assert [frame.get("locals") for frame in frames] == [None] * len(frames)


def test_a_secret_inside_a_longer_one_leaves_nothing_of_either_shown() -> None:
    """Twenty pairs, each secret inside a longer one (replaced in any order but longest
    first, a pair shows the longer one's rest: by chance, every pair in the right order
    once in a million runs)."""
    redactor = logs.Redactor()
    pairs = [(f"tok{i:02d}", f"tok{i:02d}-and-more-{i}") for i in range(20)]
    for short, long in pairs:
        redactor.add(short, long)
    text = " ".join(long for _, long in pairs)
    assert redactor.scrub(text) == " ".join(["***"] * 20)


def test_service_spec_rolls_start_first_with_rollback_and_places_on_workers() -> None:
    """The spec carries the image, labels, rollback on failure and the worker constraint."""
    svc = ServiceSpec(name="web", command=["run"], replicas=3, env={"A": "1"})
    req = DeploymentRequest(app="shop", services=[svc])
    dep = _deployment(request=req, digest="sha256:" + "1" * 64)
    spec = service_spec(dep, svc, "shop_web", constraints=["node.role == worker"])
    container = spec["TaskTemplate"]["ContainerSpec"]
    assert container["Image"] == "r.io/a/shop@sha256:" + "1" * 64
    assert container["Args"] == ["run"] and container["Env"] == ["A=1"]
    assert spec["Labels"]["deploy-agent.deployment"] == "d1"
    assert spec["UpdateConfig"]["Order"] == "start-first"
    assert spec["UpdateConfig"]["FailureAction"] == "rollback"
    assert spec["TaskTemplate"]["Placement"]["Constraints"] == ["node.role == worker"]
    assert service_spec(dep, svc, "shop_web", constraints=[])["TaskTemplate"]["Placement"] == {
        "Constraints": []
    }


def test_git_credentials_reach_git_decoded(tmp_path: Path) -> None:
    """A token with a reserved character travels percent-encoded in the URL; git's askpass
    gets the token itself."""
    env = _git_env("https://deploy:glpat-s3cr%2Ft%40x@git.example.com/r.git", tmp_path)
    assert env["DEPLOY_AGENT_GIT_USERNAME"] == "deploy"
    assert env["DEPLOY_AGENT_GIT_PASSWORD"] == "glpat-s3cr/t@x"


@pytest.mark.parametrize(
    "url",
    [
        "https://ghp_T0KEN@git.example.com:8443/r.git",
        "https://deploy:ghp_T0KEN@git.example.com:8443/r.git",
    ],
)
def test_git_is_given_the_url_without_credentials(url: str) -> None:
    """git's argument list (which any local user can read) holds no credentials, and
    the redacted URL shows none, whether the token is the user name or the password."""
    assert without_userinfo(url) == "https://git.example.com:8443/r.git"
    assert redact_url(url) == "https://***@git.example.com:8443/r.git"


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("ssh://git@github.com/acme/app.git", "ssh://git@github.com/acme/app.git"),
        ("ssh://git:pw@github.com/acme/app.git", "ssh://github.com/acme/app.git"),
        ("git://example.com/app.git", "git://example.com/app.git"),
    ],
)
def test_an_ssh_login_name_is_no_credential(url: str, kept: str) -> None:
    """Over ssh a bare user name is the login a key authenticates (`git@`): kept, so a
    clone still works after a restart; a password is a credential whatever the scheme."""
    assert without_userinfo(url) == kept


def test_a_shown_url_hides_its_query_string() -> None:
    """Tokens travel in query strings too (`?access_token=`): a URL shown in a log line
    or an API answer keeps its host and path, for the operator to tell which it is."""
    url = "https://hooks.example.com/in/deploys?access_token=T0KEN&x=1"
    assert redact_url(url) == "https://hooks.example.com/in/deploys?***"
    assert redact_url("https://u:T0KEN@h.example.com/p?k=T0KEN#f") == (
        "https://***@h.example.com/p?***#f"
    )
    assert redact_url("http://u:T0KEN@[oops/") == "(an unreadable URL)"  # never an error


def _noted(dep: Deployment, state: RetryCallState) -> None:
    """A before_sleep that holds a deployment, as the push's does."""


async def test_a_retrying_loop_leaves_no_reference_cycle_behind() -> None:
    """With the collector off, what a loop of attempts held goes as soon as it is over:
    tenacity's retrying state (cycles only the collector could free, and the leader
    makes its full passes rare) no longer keeps itself, and a deployment its callback
    holds, until the next full pass."""
    dep = _deployment()
    held_before = sys.getrefcount(dep)
    gc.disable()
    try:
        keep = AsyncRetrying(stop=stop_after_attempt(3), before_sleep=partial(_noted, dep))
        with scoped(keep) as attempts:
            async for attempt in attempts:
                with attempt:
                    dep.digest = "sha256:" + "1" * 64
        freed = weakref.ref(attempts)
        del keep, attempts, attempt
        assert freed() is None
        assert sys.getrefcount(dep) == held_before
    finally:
        gc.enable()


def test_the_loop_histogram_reads_as_prometheus_clients_own() -> None:
    """The pull histogram keeps its own counts; a scrape shows the same series and values
    a prometheus_client Histogram would, bounds and values on them included."""
    name, doc = "pulls_seconds", "How long pulls took"
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop_histogram = LoopHistogram(name, doc, PULL_BUCKETS)
    ours.register(loop_histogram)
    reference = Histogram(name, doc, buckets=PULL_BUCKETS, registry=theirs)
    for value in (0.0, 0.1, 0.1000001, 0.3, 1, 7.5, 299.9, 300, 301, 1e9):
        loop_histogram.observe(value)
        reference.observe(value)

    def series(registry: CollectorRegistry) -> list[str]:
        lines = generate_latest(registry).decode().splitlines()
        return [line for line in lines if "_created" not in line]

    assert series(ours) == series(theirs)
    assert f'{name}_bucket{{le="0.1"}} 2.0' in series(ours)


def _deployment(**fields: Any) -> Deployment:
    """A registry-mode deployment d1 of the app shop, as the store would hold it."""
    now = time.time()
    base: dict[str, Any] = {
        "id": "d1",
        "app": "shop",
        "mode": Mode.REGISTRY,
        "request": DeploymentRequest(app="shop"),
        "source": "upload",
        "created_at": now,
        "updated_at": now,
        "repository": "r.io/a/shop",
        "tag": "d1",
    }
    return Deployment(**(base | fields))


async def test_a_push_resumed_with_its_digest_recorded_is_not_redone() -> None:
    """A stop that came after the push recorded its digest, before the stage was marked
    done: the resumed push stage reaches for neither the registry nor an engine."""
    dep = _deployment(digest="sha256:" + "2" * 64)
    nothing = cast(LeaderContext, SimpleNamespace())  # any use of it would raise

    await stages.push(nothing, dep)

    assert dep.digest == "sha256:" + "2" * 64


@pytest.mark.parametrize(
    ("repository", "pushed"),
    [
        ("acme/web", "docker.io/acme/web"),
        ("docker.io/acme/web", "docker.io/acme/web"),
        ("index.docker.io/acme/web", "docker.io/acme/web"),  # was docker.io/index.docker.io/…
        ("registry-1.docker.io/acme/web", "docker.io/acme/web"),
        ("ghcr.io/acme/web", "ghcr.io/acme/web"),
        ("registry.test:5000/acme/web", "registry.test:5000/acme/web"),
    ],
)
def test_docker_hub_repositories_are_pushed_under_docker_io_by_any_of_its_names(
    repository: str, pushed: str
) -> None:
    assert push_name(repository) == pushed


WORKERS = "node.role == worker"


def _swarm_node(node_id: str, hostname: str, role: str = "worker", **spec: str) -> dict[str, Any]:
    return {
        "ID": node_id,
        "Spec": {"Role": role, "Availability": spec.get("availability", "active")},
        "Status": {"State": spec.get("state", "ready")},
        "Description": {"Hostname": hostname},
    }


@pytest.mark.parametrize(
    ("nodes", "constraints", "lacking"),
    [
        ([_swarm_node("L", "leader", "manager")], [], False),  # the leader pulls it itself
        ([_swarm_node("L", "leader", "manager"), _swarm_node("1", "w1")], [], False),
        ([_swarm_node("1", "w1"), _swarm_node("2", "w2")], ["node.role == worker"], True),
        ([_swarm_node("1", "w1"), _swarm_node("3", "w3")], ["node.role == worker"], True),
        ([_swarm_node("1", "w1"), _swarm_node("2", "w2", state="down")], [], False),
        ([_swarm_node("1", "w1"), _swarm_node("2", "w2", availability="drain")], [], False),
        (
            [_swarm_node("1", "w1"), _swarm_node("M", "m2", "manager")],
            ["node.role == worker"],
            False,
        ),
        ([_swarm_node("1", "w1"), _swarm_node("M", "m2", "manager")], [], True),
    ],
)
def test_swarm_gets_registry_credentials_only_when_a_node_may_lack_the_image(
    nodes: list[dict[str, Any]], constraints: list[str], lacking: bool
) -> None:
    """w1 reported the image present, w2 was left pending, w3 runs no agent of ours:
    only a node that may run the tasks and is not known to hold the image calls for
    credentials (which Swarm keeps in the service's spec)."""
    dep = _deployment(
        nodes={
            "w1": {"node_id": "n-1", "status": "present"},
            "w2": {"node_id": "n-2", "status": "pending"},
        }
    )
    assert may_lack_image(nodes, dep, constraints, leader_node="L") is lacking


def test_image_creation_times_order_to_the_nanosecond() -> None:
    """Two deployments of an app a second apart have images of the same whole second in
    the engine's image list: retention, going by that, once kept the older one."""
    stamps = {
        "first": "2026-11-29T13:56:11.123456789Z",
        "second": "2026-11-29T13:56:11.5Z",  # Docker trims trailing zeros
        "whole": "2026-11-29T13:56:11Z",
        "next": "2026-11-29T13:56:12.000000001Z",
    }
    ns = {name: created_ns(stamp, 0) for name, stamp in stamps.items()}
    assert sorted(ns, key=ns.__getitem__) == ["whole", "first", "second", "next"]
    assert created_ns("not a time", 1795956971) == 1795956971 * 10**9
    assert created_ns(None, 7) == 7 * 10**9


def test_a_failed_builds_leftover_is_an_image_it_committed_never_a_base_or_cache() -> None:
    """The image a failed classic build leaves for removal is the last one it committed:
    not the FROM line's base image, not a cached step's image of an earlier build, not
    an id a RUN step printed, and nothing from BuildKit's step lines."""
    from agent.retention import StepImages  # noqa: PLC0415

    base, cached, copied, ran = "a" * 12, "b" * 12, "c" * 12, "d" * 12
    log = [
        "Step 1/5 : FROM python@sha256:0123",
        f" ---> {base}",
        "Step 2/5 : COPY requirements.txt /",
        " ---> Using cache",
        f" ---> {cached}",
        "Step 3/5 : COPY . /src",
        f" ---> {copied}",
        "Step 4/5 : RUN make",
        " ---> Running in 0f0f0f0f0f0f",
        f" ---> {'e' * 12}",  # printed by the RUN itself
        "Removing intermediate container 0f0f0f0f0f0f",
        f" ---> {ran}",
        "Step 5/5 : RUN false",
        " ---> Running in 1e1e1e1e1e1e",
    ]
    seen = []
    steps = StepImages()
    for line in log:
        steps.note(line)
        seen.append(steps.last)
    assert seen[1] is None and seen[4] is None  # after FROM, after a cached step
    assert seen[6] == copied and seen[9] == copied and steps.last == ran
    only_buildkit = StepImages()
    only_buildkit.note("Step 1/1 : COPY a b", step=1)
    only_buildkit.note(f" ---> {ran}", step=1)
    assert only_buildkit.last is None


async def test_a_prebuilt_lookup_that_gets_no_answer_is_a_503_to_retry() -> None:
    """A prebuilt tag that the engine could not look up in time (the registry stalled,
    the engine's socket broke) is a 503 a control plane retries, not a 422 that says
    the request is wrong."""
    from agent.errors import EngineError  # noqa: PLC0415
    from agent.leader.pipeline import prebuilt  # noqa: PLC0415

    async def stalled(ref: str, creds: RegistryCredentials) -> None:
        raise EngineError("timed out after 30 s")

    ctx = cast(Any, SimpleNamespace(engine=SimpleNamespace(manifest=stalled)))
    creds = RegistryCredentials(server="r.example", username="u", password="p")
    with pytest.raises(RequestError) as caught:
        await prebuilt._registry_manifest(ctx, "r.example/acme/shop:1", creds)
    assert (caught.value.status, caught.value.code) == (503, "registry_unreachable")


async def test_where_a_release_is_gives_up_on_a_silent_engine_within_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`GET /v1/apps/{app}` asks the leader's engine about every release: one that does
    not answer makes each unanswered place "cannot tell" (null) once the lookup's
    deadline passes, rather than holding the request for each call's own timeout."""
    import asyncio  # noqa: PLC0415

    from agent.leader.pipeline import whereabouts  # noqa: PLC0415

    monkeypatch.setattr(whereabouts, "LOOKUP_WITHIN_S", 0.2)
    answered = {"app:1": "sha256:1"}

    async def image_id(ref: str) -> str | None:
        if ref in answered:
            return answered[ref]
        await asyncio.sleep(60)
        return None

    ctx = cast(Any, SimpleNamespace(engine=SimpleNamespace(image_id=image_id)))
    started = time.monotonic()
    found = await whereabouts._on_leader(ctx, ["app:1", "app:2", "app:3"])
    assert time.monotonic() - started < 2
    assert found == {"app:1": True, "app:2": None, "app:3": None}
