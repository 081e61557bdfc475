"""Images built elsewhere: checked and pinned when the deployment is accepted.

In registry mode the image must be on the configured registry, and a tag is resolved to
the digest it names now, so that every node runs the same image whatever the tag does
later. In local mode the image must be on the leader's engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.credentials import RegistryCredentials
from agent.engine import Manifest
from agent.errors import EngineError, RegistryAuthError, RegistryTransientError, RequestError
from agent.leader.pipeline.context import LeaderContext
from agent.leader.registry import references


@dataclass(frozen=True, slots=True)
class Image:
    """Where a deployment's image is, as its record keeps it."""

    repository: str
    tag: str
    digest: str | None = None
    image_id: str | None = None
    platform: str | None = None  # os/arch, when the image serves one platform only


async def resolve(
    ctx: LeaderContext, ref: str, creds: RegistryCredentials | None, *, tag: str
) -> Image:
    """The image `ref` names, checked where the deployment's mode takes it from; `tag`
    stands in for a reference by digest alone."""
    parsed = references.parse_reference(ref)
    if creds is None:
        return await _on_leader(ctx, parsed, tag)
    references.require_registry_host(parsed.repository, creds, "prebuilt")
    repository = references.push_name(parsed.repository)
    pinned = references.ImageReference(repository, parsed.tag, parsed.digest)
    manifest = await _registry_manifest(ctx, str(pinned), creds)
    (platform,) = manifest.platforms if len(manifest.platforms) == 1 else (None,)
    return Image(
        repository=repository,
        tag=parsed.tag or tag,
        digest=manifest.digest,
        platform=None if platform is None else str(platform),
    )


async def _on_leader(ctx: LeaderContext, ref: references.ImageReference, tag: str) -> Image:
    try:
        image_id = await ctx.engine.image_id(str(ref))
    except EngineError as exc:
        raise RequestError(
            503, "engine_unavailable", f"the leader's engine did not answer: {exc.message}"
        ) from None
    if image_id is None:
        raise RequestError(
            422,
            "invalid_request",
            f"the leader's engine holds no image {ref}",
            hint="with no registry, a prebuilt image must be on the leader's engine: build "
            "or load it there first (docker build, docker load), or configure a registry",
        )
    # a bare name is the engine's `:latest`, the image just checked
    local_tag = ref.tag or (tag if ref.digest else "latest")
    return Image(repository=ref.repository, tag=local_tag, digest=ref.digest, image_id=image_id)


async def _registry_manifest(ctx: LeaderContext, ref: str, creds: RegistryCredentials) -> Manifest:
    """What the registry serves for `ref` now; a RequestError that says why not."""
    try:
        manifest = await ctx.engine.manifest(ref, creds)
    except RegistryAuthError as exc:
        raise RequestError(
            422,
            "invalid_request",
            f"the registry refused to show {ref}: {exc.message}",
            hint="check that the registry token may read (pull) this repository",
        ) from None
    except RegistryTransientError as exc:
        raise RequestError(
            503,
            "registry_unreachable",
            f"the registry did not answer for {ref}: {exc.message}",
            hint="check that the registry is up and reachable from the leader, then resubmit",
        ) from None
    except EngineError as exc:  # no answer in time, from the registry or the engine
        raise RequestError(
            503,
            "registry_unreachable",
            f"{ref} could not be looked up through the leader's engine: {exc.message}",
            hint="check that the registry and the leader's engine answer, then resubmit",
        ) from None
    if manifest is None:
        what = "manifest" if "@" in ref else "tag"
        raise RequestError(
            422,
            "invalid_request",
            f"the registry has no {what} {ref}",
            hint="push the image there first, or check the name and tag",
        )
    return manifest
