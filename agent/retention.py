"""Image retention: keep the images of an app's last releases, remove the rest of its
images that nothing uses, and what a build that did not finish left behind.

Shared by leader and workers. The leader names the images to hold (its last releases',
so that a rollback finds them, and those of its deployments under way); without that
list (a worker of the previous protocol is sent none) the newest images by date stay.
An image a running container uses (a service's task, or anything else), or that a Swarm
service's spec names, is never removed; stopped containers, such as Swarm's task
history, do not keep an image. Only images with the app's label are candidates: an image
built elsewhere (a prebuilt deployment's) is never removed here.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from agent.engine import Engine
from agent.errors import EngineApiError, EngineError
from agent.logs import get_logger

log = get_logger(__name__)
APP_LABEL = "deploy-agent.app"
# The deployment that built an image: its id starts with its time (YYYYmmddHHMMSS), so
# images sort by it. An image's own creation time cannot serve: BuildKit gives an image
# the time of its newest layer, which a cached build took from an earlier one.
DEPLOYMENT_LABEL = "deploy-agent.deployment"


async def prune_app_images(
    engine: Engine,
    app: str,
    keep: int,
    hold: Sequence[str] | None = None,
    spare: Iterable[str] = (),
) -> list[str]:
    """Remove `app`'s unused images but those `hold` and `spare` name (references);
    with no `hold`, those beyond the newest `keep`. Return the ids removed."""
    filters = json.dumps({"label": [f"{APP_LABEL}={app}"]})
    images: list[dict[str, Any]] = await engine.request(
        "GET", "images/json", params={"filters": filters}
    )
    if hold is None:
        candidates = [] if len(images) <= keep else (await _newest_first(engine, images))[keep:]
    else:
        held = await _ids_of(engine, [*hold, *spare])
        candidates = [image["Id"] for image in images if image["Id"] not in held]
    if not candidates:
        return []
    in_use = await _images_in_use(engine)
    removed = []
    for image_id in candidates:
        if image_id not in in_use and await _remove(engine, image_id):
            removed.append(image_id)
    if removed:
        log.info("retention.removed", app=app, images=len(removed), kept=keep)
    return removed


async def _ids_of(engine: Engine, refs: Iterable[str]) -> set[str]:
    """The ids of the images the engine holds among `refs`."""
    ids = set()
    for ref in dict.fromkeys(refs):
        image_id = await engine.image_id(ref)
        if image_id is not None:
            ids.add(image_id)
    return ids


async def _newest_first(engine: Engine, images: list[dict[str, Any]]) -> list[str]:
    """The images' ids, newest first: by the deployment that built them, then (for
    images of releases before that label) by creation time. The list's own creation
    times are whole seconds, and deployments a second apart are common: each image's
    own record has them to the nanosecond."""
    created: dict[str, tuple[str, int]] = {}
    for image in images:
        try:
            info = await engine.request("GET", f"images/{image['Id']}/json")
        except EngineApiError as exc:
            if exc.status == 404:  # removed meanwhile (the retention of a deployment before)
                continue
            raise
        deployment = (image.get("Labels") or {}).get(DEPLOYMENT_LABEL, "")
        created[image["Id"]] = (deployment, created_ns(info.get("Created"), image["Created"]))
    return sorted(created, key=created.__getitem__, reverse=True)


def created_ns(stamp: object, seconds: int) -> int:
    """An image's creation time in nanoseconds, from its RFC 3339 stamp (Docker writes
    `2026-11-29T13:56:11.123456789Z`), else from its whole seconds."""
    if isinstance(stamp, str) and stamp.endswith("Z"):
        whole, _, fraction = stamp[:-1].partition(".")
        try:
            at = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.UTC)
            return int(at.timestamp()) * 10**9 + int(fraction.ljust(9, "0")[:9] or 0)
        except ValueError:
            pass
    return seconds * 10**9


async def _images_in_use(engine: Engine) -> set[str]:
    """Images of running containers, and those the Swarm services name (to run now, or
    to roll back to): a service scaled to zero, or whose task is restarting, runs none,
    yet still needs its image, which in local mode no registry could give back. Stopped
    containers (Swarm's task history) do not pin."""
    containers = await engine.request("GET", "containers/json")
    used = {c["ImageID"] for c in containers}
    for ref in await _service_images(engine):
        image_id = await engine.image_id(ref)
        if image_id is not None:
            used.add(image_id)
    return used


async def _service_images(engine: Engine) -> set[str]:
    """The image references of the Swarm services' specs, current and previous; none
    when the engine is no Swarm manager (a worker's: it has no services to ask about)."""
    try:
        services: list[dict[str, Any]] = await engine.request("GET", "services")
    except EngineApiError as exc:
        if exc.status == 503 and await _outside_swarm_control(engine):
            return set()
        raise  # a locked Swarm answers 503 too: its services are not known, keep all
    refs = set()
    for service in services:
        for spec in (service.get("Spec"), service.get("PreviousSpec")):
            container = ((spec or {}).get("TaskTemplate") or {}).get("ContainerSpec") or {}
            if container.get("Image"):
                refs.add(str(container["Image"]))
    return refs


async def _outside_swarm_control(engine: Engine) -> bool:
    """Whether the engine has no Swarm services to tell of: in no Swarm, or a worker of
    one. A manager that answers 503 is locked (autolock after a restart) or without
    quorum: its services still name images, unknown until it is back."""
    swarm = (await engine.request("GET", "info")).get("Swarm") or {}
    state = swarm.get("LocalNodeState")
    return state == "inactive" or (state == "active" and not swarm.get("ControlAvailable"))


async def _remove(engine: Engine, image_id: str) -> bool:
    try:
        await engine.request("DELETE", f"images/{image_id}", params={"force": "1"})
    except EngineApiError as exc:
        if exc.status in (404, 409):  # gone already, or a container still needs it
            return False
        raise
    except EngineError as exc:
        log.warning("retention.failed", image=image_id, error=exc.message)
        return False
    return True


async def prune_build_cache(engine: Engine, keep_bytes: int) -> int:
    """Remove the engine's least recently used BuildKit build cache until at most
    `keep_bytes` remain; return the bytes freed. Callers run it only while no build runs
    on that engine (agent/leader/pipeline/build_server.py, `Builders.prune_build_cache`)."""
    freed = await engine.prune_build_cache(keep_bytes)
    if freed:
        log.info("retention.build_cache_pruned", freed_bytes=freed, kept_bytes=keep_bytes)
    return freed


# A classic build's line for a step's result: ` ---> 3f9c2d1a0b4e` (not `Running in`).
STEP_IMAGE = re.compile(r"^ ---> ([0-9a-f]{12,64})$")
STEP_START = re.compile(r"^Step \d+/\d+ : (\w+)", re.I)
CONTAINER_REMOVED = "Removing intermediate container"


class StepImages:
    """The last image the classic builder committed for this build, read from its log as
    it goes by. Only an image this build made counts: the ` ---> ID` right after
    `Removing intermediate container` (a step run in a container: RUN, ENV…) or right
    after a COPY or ADD step's own line. After a FROM line it names the base image, and
    after `Using cache` an image of an earlier build: neither is this build's to remove.
    BuildKit's lines (of a step) are not looked at: its steps stay in its cache."""

    def __init__(self) -> None:
        self.last: str | None = None
        self._previous = ""

    def note(self, line: str, step: int | None = None) -> None:
        if step is not None:
            return
        text = line.rstrip()
        found = STEP_IMAGE.match(text)
        if found and self._commits(self._previous):
            self.last = found.group(1)
        self._previous = text

    @staticmethod
    def _commits(previous: str) -> bool:
        if previous.startswith(CONTAINER_REMOVED):
            return True
        step = STEP_START.match(previous)
        return step is not None and step.group(1).upper() != "FROM"


async def remove_leftover(engine: Engine, image_id: str | None) -> bool:
    """Remove the image of the last step a failed or cancelled build finished, and with
    it its untagged parents, when nothing else has a use for it: untagged, no image
    built on it, no container from it (the engine refuses the last two). Without this it
    stays as a `<none>` image that no app's retention ever lists. True if removed.

    A cancelled build's step container goes a moment after the build stream does: an
    image still held by a container is asked for again, for a few seconds."""
    if image_id is None:
        return False
    try:
        info = await engine.request("GET", f"images/{image_id}/json")
        if info.get("RepoTags") or info.get("RepoDigests"):  # named: someone's image
            return False
        await _delete_when_free(engine, image_id)
    except EngineError as exc:  # in use, or built upon: another build's cache
        log.info("retention.leftover_kept", image=image_id, reason=exc.message)
        return False
    log.info("retention.leftover_removed", image=image_id)
    return True


LEFTOVER_WAIT_S = 10.0


async def _delete_when_free(engine: Engine, image_id: str) -> None:
    waited = 0.0
    while True:
        try:
            await engine.request("DELETE", f"images/{image_id}")
            return
        except EngineApiError as exc:
            if exc.status != 409 or "container" not in exc.message or waited >= LEFTOVER_WAIT_S:
                raise
        await asyncio.sleep(0.5)
        waited += 0.5
