"""The build stage: the context made ready, the builder, platform and cache chosen, the
image built and checked against the workers' architectures.

BuildKit builds unless the engine lacks it or the config says classic. An image built
for a platform the workers cannot run never leaves this stage.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from agent.buildlog import BuildEvent, BuildLine, event_type
from agent.credentials import RegistryCredentials
from agent.engine import BuildSpec, Engine, EngineFacts, PushProgress
from agent.errors import BuildError, DeploymentError, EngineError, RequestError, SshError
from agent.leader.pipeline import platforms
from agent.leader.pipeline.archive import check_context
from agent.leader.pipeline.build_server import BuilderChoice, choose_builder
from agent.leader.pipeline.context import LeaderContext
from agent.leader.pipeline.context_files import adapt_archive
from agent.leader.pipeline.sources import clone_to_context
from agent.leader.state.models import Deployment, Mode, State
from agent.logs import get_logger
from agent.retention import APP_LABEL, DEPLOYMENT_LABEL, StepImages, remove_leftover
from agent.urls import redact_url

log = get_logger(__name__)
BUILD_SERVER_HINT = (
    "check the build server's SSH access and its Docker socket (leader.build_server)"
)
DOCKERFILE_HINT = "read the build log (deploy-agent deploy follows it) and fix the Dockerfile"
SESSION_HINT = (
    "RUN --mount=type=secret and --mount=type=ssh need a client session, which builds "
    "through the Engine API do not have: pass what the step needs as a build argument, "
    "or fetch it inside the step"
)
NETWORK_HINT = (
    "the build engine has no default bridge network (dockerd --bridge=none): set "
    'leader.build_network = "host", or give the engine its bridge'
)
ENGINE_HINT = (
    "the Docker Engine failed this build, not the Dockerfile: check the engine (docker info, "
    "its log, free disk space, its networks), then deploy again"
)
# What a build's error says when the engine or the host failed it, not a step of the
# Dockerfile: the engine gone mid-build, a network it lacks, a full or broken disk.
ENGINE_FAULTS = re.compile(
    r"lost the engine|stream ended before|network \S+ not found|no space left on device"
    r"|failed to create shim|OCI runtime|failed to register layer|error creating overlay"
    r"|input/output error|read-only file system|Cannot connect to the Docker daemon",
    re.IGNORECASE,
)
# What the engine says when an image a build is using was removed meanwhile.
IMAGE_VANISHED = "unable to find image"
# A pull of the previous image, for its cache, may take this long; then the build goes on
# without it.
CACHE_PULL_S = 300.0


class BuildFailed(DeploymentError):
    def __init__(self, message: str, log_tail: list[str], hint: str = DOCKERFILE_HINT) -> None:
        super().__init__("build_failed", f"the image build failed: {message}", hint=hint)
        self.log_tail = log_tail


def build_hint(message: str) -> str:
    """What to do about a failed build: the engine's fault, or the Dockerfile's."""
    return ENGINE_HINT if ENGINE_FAULTS.search(message) else DOCKERFILE_HINT


async def build(ctx: LeaderContext, dep: Deployment) -> None:
    context = await _prepare_context(ctx, dep)
    archs = await _worker_archs(ctx, dep)
    try:
        async with ctx.builders.engine() as engine, ctx.builders.building():
            facts = await engine.facts()
            choice = choose_builder(ctx.config.builder, facts)
            ctx.builders.last_choice = choice
            spec = await _spec(ctx, dep, engine, facts=facts, choice=choice, archs=archs)
            drop_link = choice.builder == "buildkit" and not facts.copy_link
            await _adapt(context, dep, drop_link=drop_link)
            await _record_start(ctx, dep, choice, spec)
            try:
                dep.image_id = await _again_if_an_image_vanished(ctx, dep, engine, context, spec)
            except BuildError as exc:
                raise _build_failure(exc, spec.platform, archs) from None
            built = await engine.image_platform(spec.tag)
    except EngineError as exc:
        raise BuildFailed(exc.message, [], ENGINE_HINT) from None
    except SshError as exc:
        raise BuildFailed(exc.message, [], BUILD_SERVER_HINT) from None
    dep.platform = str(built) if built else None
    platforms.check_image(dep.platform, archs)


async def _again_if_an_image_vanished(
    ctx: LeaderContext, dep: Deployment, engine: Engine, context: Path, spec: BuildSpec
) -> str:
    """Build; once more if an image the build used was removed under it. Retention waits
    for builds (build_gate.py), but an operator's `docker image prune` does not."""
    try:
        return await _cleaned_up_after(engine, context, spec, _BuildEvents(ctx, dep))
    except BuildError as exc:
        if IMAGE_VANISHED not in exc.message:
            raise
        log.warning("build.retry", deployment=dep.id, error=exc.message)
        await ctx.journal.record(dep.id, "build.retry", error=exc.message)
    return await _cleaned_up_after(engine, context, spec, _BuildEvents(ctx, dep))


async def _cleaned_up_after(
    engine: Engine, context: Path, spec: BuildSpec, events: _BuildEvents
) -> str:
    """Build; a build that fails or is cancelled takes what it built so far with it: the
    classic builder leaves each finished step as an image, which no app's retention
    lists (BuildKit keeps its steps in its cache, which has a retention of its own)."""
    try:
        return await engine.build(context, spec, events)
    except BaseException:
        await asyncio.shield(_remove_leftover(engine, events.steps.last))
        raise


# A cancel or a stop waits for the clean-up: it gets this long, whatever the engine does.
LEFTOVER_WITHIN_S = 15.0


async def _remove_leftover(engine: Engine, image_id: str | None) -> None:
    """Best effort, and never in the way of the build's own error."""
    try:
        async with asyncio.timeout(LEFTOVER_WITHIN_S):
            await remove_leftover(engine, image_id)
    except Exception as exc:  # a broken tunnel to a build server, or no answer in time
        log.warning("retention.leftover_failed", image=image_id, error=repr(exc))


async def _prepare_context(ctx: LeaderContext, dep: Deployment) -> Path:
    path = ctx.context_path(dep.id)
    git = dep.request.git
    if git is not None:
        url = _git_url(ctx, dep, git.url)
        await ctx.journal.record(dep.id, "source", url=redact_url(git.url), ref=git.ref)
        commit = await clone_to_context(
            url,
            git.ref,
            path,
            deadline=ctx.config.git_timeout,
            max_bytes=ctx.config.max_context_bytes,
            dockerfile=dep.request.dockerfile,
        )
        await ctx.journal.record(dep.id, "source", commit=commit)
        try:
            await asyncio.to_thread(
                check_context, path, dep.request.dockerfile, ctx.config.max_context_bytes
            )
        except RequestError as exc:
            raise DeploymentError("source_unavailable", exc.message, exc.hint) from None
    elif not path.exists():
        raise DeploymentError(
            "source_unavailable",
            "the uploaded build context is no longer in the leader's state directory",
            hint="submit the deployment again",
        )
    return path


def _git_url(ctx: LeaderContext, dep: Deployment, stored: str) -> str:
    """The URL to clone: with the credentials it was given with, which the leader kept
    in memory for this clone only; gone after a restart."""
    if not dep.git_credentials:
        return stored
    url = ctx.git_credentials.take(dep.id)
    if url is None:
        raise DeploymentError(
            "source_unavailable",
            "the git credentials of this deployment were kept in memory only, and the "
            "leader restarted before its clone",
            hint="submit the deployment again with its credentials",
        )
    return url


async def _worker_archs(ctx: LeaderContext, dep: Deployment) -> dict[str, str]:
    """The architectures of the workers the image goes to (none in local mode)."""
    if dep.mode is not Mode.REGISTRY:
        return {}
    await ctx.hub.flush()  # what the workers' links told of them, written first
    return platforms.node_archs(await ctx.store.nodes())


async def _spec(
    ctx: LeaderContext,
    dep: Deployment,
    engine: Engine,
    *,
    facts: EngineFacts,
    choice: BuilderChoice,
    archs: dict[str, str],
) -> BuildSpec:
    # Retention finds the app's images by the one label and orders them by the other.
    labels = {**dep.request.labels, APP_LABEL: dep.app, DEPLOYMENT_LABEL: dep.id}
    return BuildSpec(
        tag=f"{dep.repository}:{dep.tag}",
        dockerfile=dep.request.dockerfile,
        build_args=dep.request.build_args,
        labels=labels,
        target=dep.request.target,
        platform=platforms.target_platform(archs, facts.arch),
        builder=choice.builder,
        network=ctx.config.build_network,
        cache_from=await _cache_sources(ctx, dep, engine),
    )


async def _adapt(context: Path, dep: Deployment, *, drop_link: bool) -> None:
    """The context as the engine must see it: its .dockerignore applied, and `--link`
    off the Dockerfile for a frontend that predates it."""
    if await asyncio.to_thread(adapt_archive, context, dep.request.dockerfile, drop_link=drop_link):
        log.info("build.context_adapted", drop_link=drop_link)


async def _cache_sources(ctx: LeaderContext, dep: Deployment, engine: Engine) -> tuple[str, ...]:
    """The app's current release, as a source of cached layers: its image carries its
    build cache metadata (BUILDKIT_INLINE_CACHE). An engine that does not hold it (a new
    build server, a new leader engine) pulls it from the registry first; without it the
    build goes on uncached."""
    previous = await ctx.store.list_deployments(app=dep.app, state=State.SUCCEEDED.value, limit=1)
    if not previous or previous[0].image_id is None:
        return ()
    ref = previous[0].image_ref
    if await engine.image_id(ref) is not None:
        return (ref,)
    creds = ctx.registry.current
    if previous[0].digest is None or creds is None:
        return ()
    return (ref,) if await _pulled(ctx, dep, engine, ref, creds) else ()


async def _pulled(
    ctx: LeaderContext, dep: Deployment, engine: Engine, ref: str, creds: RegistryCredentials
) -> bool:
    async def quiet(progress: PushProgress) -> None:
        return None

    await ctx.journal.record(dep.id, "cache", status="pulling", image=ref)
    try:
        async with asyncio.timeout(CACHE_PULL_S):
            await engine.pull(ref, creds, quiet)
    except (EngineError, TimeoutError) as exc:
        error = getattr(exc, "message", None) or f"no answer within {CACHE_PULL_S:.0f} s"
        log.warning("build.cache_pull_failed", image=ref, error=error)
        await ctx.journal.record(dep.id, "cache", status="unavailable", image=ref, error=error)
        return False
    await ctx.journal.record(dep.id, "cache", status="pulled", image=ref)
    return True


async def _record_start(
    ctx: LeaderContext, dep: Deployment, choice: BuilderChoice, spec: BuildSpec
) -> None:
    dep.builder = choice.builder
    await ctx.journal.save(
        dep,
        "build",
        builder=choice.builder,
        reason=choice.reason,
        where=ctx.builders.describe(),
        platform=spec.platform,
        target=spec.target,
        cache_from=list(spec.cache_from),
    )


class _BuildEvents:
    """Build steps and lines, as they come, into the deployment's events."""

    def __init__(self, ctx: LeaderContext, dep: Deployment) -> None:
        self._ctx = ctx
        self._dep = dep
        self.steps = StepImages()

    async def __call__(self, event: BuildEvent) -> None:
        if isinstance(event, BuildLine):
            self.steps.note(event.line, event.step)
        await self._ctx.journal.record(self._dep.id, event_type(event), **event.fields())


def _build_failure(exc: BuildError, platform: str | None, archs: dict[str, str]) -> DeploymentError:
    text = exc.message.lower()
    # runc says it in the step's output; the engine's error is then "exit code: 1"
    foreign = any("exec format error" in line for line in [text, *exc.log_tail])
    if foreign and platform is not None:
        return DeploymentError(
            "platform_mismatch",
            f"the build engine cannot run {platform} programs, the workers' ("
            + ", ".join(f"{name} ({arch})" for name, arch in sorted(archs.items()))
            + f"): {exc.message}",
            hint=platforms.EMULATION_HINT,
        )
    if "no active session" in text:
        return BuildFailed(exc.message, exc.log_tail, SESSION_HINT)
    if "network bridge not found" in text:
        return BuildFailed(exc.message, exc.log_tail, NETWORK_HINT)
    return BuildFailed(exc.message, exc.log_tail, build_hint(exc.message))
