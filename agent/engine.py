"""The Docker Engine, reached through aiodocker: the only module that imports it.

Every call has a deadline. Streams (build, push) count as done only when the engine
reported their success marker; an error is classified here, once, into agent errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiodocker
import aiohttp
from aiodocker.utils import compose_auth_header
from aiohttp.client_proto import ResponseHandler

from agent import engine_url
from agent.backoff import Backoff
from agent.buildkit.trace import TRACE_ID, TraceDecoder
from agent.buildlog import BuildEvent, BuildLine, event_type, plain
from agent.credentials import RegistryCredentials
from agent.errors import (
    BuildError,
    EngineApiError,
    EngineError,
    RegistryAuthError,
    RegistryError,
    RegistryTransientError,
)
from agent.logs import get_logger

_log = get_logger(__name__)
_DIGEST_LINE = re.compile(r": digest: (sha256:[0-9a-f]{64}) size: \d+")
_AUTH_MARKERS = (
    "unauthorized",
    "authentication required",
    "denied",
    "401 unauthorized",
    "403 forbidden",
    "insufficient_scope",
    "no basic auth credentials",
    "incorrect username or password",
)
_UNREACHABLE_MARKERS = (
    "connection refused",
    "connection reset",
    "no such host",
    "i/o timeout",
    "no route to host",
    "network is unreachable",
    "tls handshake timeout",
    "broken pipe",
    "timeout",
    "dial tcp",
)
# Go's io.EOF, as a word: a repository such as "geofence" is not a dropped connection.
_EOF = re.compile(r"\beof\b")
_SERVER_MARKERS = (
    "toomanyrequests",
    "too many requests",
    "bad gateway",
    "service unavailable",
    "gateway timeout",
    "internal server error",
)
# An HTTP status the registry may recover from: 429 or 5xx, written as a status line
# ("503 Service Unavailable") or after "status:". A bare number is not enough: the
# registry's address is in most messages, and a port such as 44297 holds "429".
_SERVER_STATUS = re.compile(r"(?<![\d.:])(?:429|5\d\d)\s+[a-z]|status:\s*(?:429|5\d\d)\b")
BUILD_LOG_TAIL = 30
# A push that reports nothing for this long is stuck (a registry that stopped answering):
# the attempt ends as transient and is retried. Builds have no such limit: a RUN step may
# rightly be silent for long.
PUSH_IDLE_SECONDS = 60.0


def classify_registry_error(message: str, repository: str | None = None) -> RegistryError:
    """Sort a registry failure reported by the engine into auth, transient or final.

    The repository's name is blanked out first: a repository called "timeout-svc" or
    "acme/denied" says nothing about why the registry failed."""
    text = _without_names(message.lower(), repository)
    if any(marker in text for marker in _AUTH_MARKERS):
        return RegistryAuthError(message)
    if any(marker in text for marker in _SERVER_MARKERS) or _SERVER_STATUS.search(text):
        return RegistryTransientError(message, unreachable=False)
    if any(marker in text for marker in _UNREACHABLE_MARKERS) or _EOF.search(text):
        return RegistryTransientError(message, unreachable=True)
    return RegistryError(message)


def _without_names(text: str, repository: str | None) -> str:
    """`text` with the repository, with and without its registry host, as whole words
    replaced by a placeholder."""
    if not repository:
        return text
    full = repository.lower()
    host, _, path = full.partition("/")
    names = [full, path] if path and ("." in host or ":" in host or host == "localhost") else [full]
    for name in names:
        text = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", "<repository>", text)
    return text


@dataclass(frozen=True, slots=True)
class PushProgress:
    layer: str
    status: str
    current: int | None
    total: int | None


BuildSink = Callable[[BuildEvent], Awaitable[None]]
ProgressSink = Callable[[PushProgress], Awaitable[None]]
Builder = Literal["buildkit", "classic"]
# BuildKit came with API 1.39 (Engine 18.09), on Linux engines only.
BUILDKIT_MIN_API = (1, 39)
# The Dockerfile frontend built into engines before 23.0 (BuildKit 0.8 to 0.10) does not
# know COPY --link; without a `# syntax=` image it is the frontend there is.
LINK_MIN_ENGINE = 23
INLINE_CACHE_ARG = "BUILDKIT_INLINE_CACHE"


@dataclass(frozen=True, slots=True)
class BuildSpec:
    """What to build and how: the Engine API's /build parameters the agent uses."""

    tag: str
    dockerfile: str = "Dockerfile"
    build_args: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    platform: str | None = None  # os/arch, e.g. linux/arm64; None: the engine's own
    builder: Builder = "buildkit"
    network: str = "default"  # RUN steps' network: default (the engine's bridge), host, none
    cache_from: tuple[str, ...] = ()

    def params(self) -> dict[str, str]:
        build_args = dict(self.build_args)
        params = {
            "t": self.tag,
            "dockerfile": self.dockerfile,
            "labels": json.dumps(dict(self.labels)),
        }
        if self.builder == "buildkit":
            # The image carries its own cache metadata: another engine's build can reuse
            # its layers from the registry (cache_from), with no cache export of its own.
            build_args[INLINE_CACHE_ARG] = "1"
            params["version"] = "2"
        else:
            params["forcerm"] = "1"
        params["buildargs"] = json.dumps(build_args)
        optional = {
            "target": self.target,
            "platform": self.platform,
            "networkmode": None if self.network == "default" else self.network,
            "cachefrom": json.dumps(list(self.cache_from)) if self.cache_from else None,
        }
        return params | {key: value for key, value in optional.items() if value}


@dataclass(frozen=True, slots=True)
class EngineFacts:
    """What the agent needs to know of an engine before it builds there."""

    version: str
    api_version: str
    os: str
    arch: str

    @classmethod
    def of(cls, info: Mapping[str, Any]) -> EngineFacts:
        return cls(
            version=str(info.get("Version", "")),
            api_version=str(info.get("ApiVersion", "")),
            os=str(info.get("Os", "")),
            arch=str(info.get("Arch", "")),
        )

    @property
    def buildkit(self) -> bool:
        return self.os == "linux" and _version_tuple(self.api_version) >= BUILDKIT_MIN_API

    @property
    def copy_link(self) -> bool:
        """Whether its built-in Dockerfile frontend knows COPY --link."""
        return _version_tuple(self.version)[:1] >= (LINK_MIN_ENGINE,)


@dataclass(frozen=True, slots=True)
class ImagePlatform:
    os: str
    arch: str
    variant: str | None = None

    def __str__(self) -> str:
        return f"{self.os}/{self.arch}" + (f"/{self.variant}" if self.variant else "")


@dataclass(frozen=True, slots=True)
class Manifest:
    """A registry's manifest for an image: its digest, and the platforms it serves (one
    for an image, each of an index's)."""

    digest: str
    platforms: tuple[ImagePlatform, ...] = ()


def _platform_of(doc: Mapping[str, Any]) -> ImagePlatform:
    variant = doc.get("variant")
    return ImagePlatform(str(doc.get("os")), str(doc.get("architecture")), variant or None)


def _version_tuple(text: str) -> tuple[int, ...]:
    """`20.10.24+dfsg1` as (20, 10, 24); what is not a number ends it."""
    numbers = []
    for part in re.split(r"[.+~-]", text):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


class Engine:
    """One Docker Engine endpoint and the operations the agent needs from it."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self.url = engine_url.normalized(url)
        self._timeout = timeout
        self._docker = aiodocker.Docker(url=self.url)
        # The protocol of every connection aiohttp opens to the engine (a private
        # attribute of its connectors, in the aiohttp range pyproject.toml pins).
        protocol: Callable[..., ResponseHandler] = _CutOnClose
        loop = asyncio.get_running_loop()
        self._docker.connector._factory = functools.partial(protocol, loop=loop)

    async def close(self) -> None:
        await self._docker.close()

    async def version(self) -> dict[str, Any]:
        try:
            async with self._deadline("version"):
                info: dict[str, Any] = await self._docker.version()
        except aiodocker.DockerError as exc:
            raise EngineError(f"Docker Engine at {self.url}: {exc.message}") from None
        return info

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """One Engine API call with a JSON answer, under the engine deadline.

        For what aiodocker's helpers lack (full service specs, registry auth on update).
        """
        try:
            async with self._deadline(f"{method} {path}"):
                return await self._docker._query_json(
                    path, method, params=dict(params or {}), data=body, headers=headers
                )
        except aiodocker.DockerError as exc:
            if exc.status == 900:
                raise EngineError(str(exc.message)) from None
            raise EngineApiError(exc.status, str(exc.message).strip()) from None

    def registry_auth_header(self, creds: RegistryCredentials) -> dict[str, str]:
        return {"X-Registry-Auth": compose_auth_header(creds.engine_auth())}

    async def wait_until_up(
        self, stop: asyncio.Event, waiting: Callable[[str], None]
    ) -> str | None:
        """The engine's version once it answers, asking again with backoff while it does
        not (`waiting` hears why); None when `stop` is set first."""
        backoff = Backoff(initial=1.0, cap=15.0)
        while not stop.is_set():
            try:
                return str((await self.version()).get("Version"))
            except EngineError as exc:
                delay = backoff.next()
                _log.warning("engine.waiting", error=exc.message, retry_in_s=round(delay, 1))
                waiting(exc.message)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
        return None

    async def facts(self) -> EngineFacts:
        return EngineFacts.of(await self.version())

    async def image_platform(self, ref: str) -> ImagePlatform | None:
        """The platform a local image was built for, or None when the engine lacks it."""
        info = await self._inspect_image(ref)
        if info is None:
            return None
        variant = info.get("Variant")
        return ImagePlatform(str(info.get("Os")), str(info.get("Architecture")), variant or None)

    async def prune_build_cache(self, keep_bytes: int) -> int:
        """Remove BuildKit's least recently used build cache until at most `keep_bytes`
        remain (what a running build uses stays); return the bytes freed."""
        answer = await self.request("POST", "build/prune", params={"keep-storage": str(keep_bytes)})
        return int((answer or {}).get("SpaceReclaimed") or 0)

    async def image_id(self, ref: str) -> str | None:
        """The id of a local image, or None when the engine does not hold it."""
        info = await self._inspect_image(ref)
        return None if info is None else str(info["Id"])

    async def _inspect_image(self, ref: str) -> dict[str, Any] | None:
        try:
            async with self._deadline("image inspect"):
                info: dict[str, Any] = await self._docker.images.inspect(ref)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise EngineError(f"image inspect {ref}: {exc.message}") from None
        return info

    async def manifest(self, ref: str, creds: RegistryCredentials | None) -> Manifest | None:
        """What the registry serves for `ref` (by tag or by digest), asked through the
        engine with `creds`; None when the registry has no such manifest. Any other
        failure is raised, classified like a push's."""
        headers = self.registry_auth_header(creds) if creds is not None else {}
        repository = ref.partition("@")[0]
        try:
            async with self._deadline("distribution inspect"):
                doc = await self._docker._query_json(
                    f"distribution/{ref}/json", "GET", headers=headers
                )
        except aiodocker.DockerError as exc:
            if exc.status == 404 and "page not found" not in str(exc.message):
                return None  # the registry said: manifest (or repository) unknown
            raise _engine_or_registry(exc, repository) from None
        digest = (doc.get("Descriptor") or {}).get("digest") if isinstance(doc, dict) else None
        if not isinstance(digest, str):
            raise RegistryError(f"the registry's answer for {ref} names no digest")
        return Manifest(digest, tuple(_platform_of(p) for p in doc.get("Platforms") or ()))

    async def remove_image(self, ref: str) -> None:
        try:
            async with self._deadline("image remove"):
                await self._docker.images.delete(ref)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise EngineError(f"image remove {ref}: {exc.message}") from None

    async def login(self, creds: RegistryCredentials) -> None:
        """Ask the engine to log in to the registry; raise with the registry's reason."""
        try:
            async with self._deadline("registry login"):
                await self._docker.auth(**creds.engine_auth())
        except aiodocker.DockerError as exc:
            raise _engine_or_registry(exc) from None

    async def build(self, context: Path, spec: BuildSpec, on_event: BuildSink) -> str:
        """Build `context` (a tar, gzip or not) as `spec` says; return the image id.

        Progress reaches `on_event` as it comes: BuildKit's steps and their output, or the
        classic builder's lines."""
        log = _BuildLog(on_event)
        headers = {
            "Content-Type": "application/x-tar",
            "Content-Encoding": "gzip" if _is_gzip(context) else "identity",
        }
        try:
            async with contextlib.aclosing(
                self._stream(
                    "build", params=spec.params(), headers=headers, data=_read_file(context)
                )
            ) as stream:
                async for item in stream:
                    await log.feed(item)
        except _StreamError as exc:
            await log.flush()
            raise BuildError(exc.message, log.tail) from None
        except aiodocker.DockerError as exc:
            raise BuildError(str(exc.message).strip(), log.tail) from None
        except aiohttp.ClientError as exc:
            raise BuildError(f"lost the engine mid-build: {exc}", log.tail) from None
        await log.flush()
        if log.image_id is None:
            raise BuildError("the build stream ended before the engine reported an image", log.tail)
        return log.image_id

    async def push(
        self, repository: str, tag: str, creds: RegistryCredentials, on_progress: ProgressSink
    ) -> str:
        """Push `repository:tag` once; return its digest, or raise a classified error."""
        digest: str | None = None

        async def watch(item: Mapping[str, Any]) -> None:
            nonlocal digest
            digest = _digest_of(item) or digest
            if "id" in item and "status" in item:
                await on_progress(_progress_of(item))

        params = {"tag": tag}
        path = f"images/{repository}/push"
        await self._registry_stream("push", path, params, creds, watch, repository=repository)
        if digest is None:
            raise RegistryTransientError(
                "the push stream ended before the registry confirmed a digest", unreachable=False
            )
        return digest

    async def pull(
        self, ref: str, creds: RegistryCredentials | None, on_progress: ProgressSink
    ) -> None:
        """Pull `ref` (repository@digest); done only when the engine then holds it."""
        repository, _, digest = ref.partition("@")

        async def watch(item: Mapping[str, Any]) -> None:
            if "id" in item and "status" in item:
                await on_progress(_progress_of(item))

        params = {"fromImage": repository, "tag": digest}
        path = "images/create"
        await self._registry_stream("pull", path, params, creds, watch, repository=repository)
        if await self.image_id(ref) is None:
            raise RegistryTransientError(
                "the pull stream ended but the engine does not hold the image", unreachable=False
            )

    async def _registry_stream(
        self,
        what: str,
        path: str,
        params: Mapping[str, str],
        creds: RegistryCredentials | None,
        watch: Callable[[Mapping[str, Any]], Awaitable[None]],
        *,
        repository: str,
    ) -> None:
        """Run a push or pull stream to its end; raise its failure, classified."""
        headers = {"X-Registry-Auth": compose_auth_header(creds.engine_auth())} if creds else {}
        try:
            async with contextlib.aclosing(
                self._stream(path, params=params, headers=headers, idle_timeout=PUSH_IDLE_SECONDS)
            ) as stream:
                async for item in stream:
                    await watch(item)
        except _StreamError as exc:
            raise classify_registry_error(exc.message, repository) from None
        except aiodocker.DockerError as exc:
            raise _engine_or_registry(exc, repository) from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise RegistryTransientError(f"{what} stream broke: {exc}", unreachable=False) from None
        except TimeoutError:
            raise RegistryTransientError(
                f"the {what} made no progress for {PUSH_IDLE_SECONDS:.0f} s", unreachable=True
            ) from None

    async def _stream(
        self,
        path: str,
        *,
        params: Mapping[str, str],
        headers: Mapping[str, str],
        data: AsyncIterator[bytes] | None = None,
        idle_timeout: float | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """POST to a streaming endpoint; yield its JSON lines; close the connection on exit.

        Closing the connection is what tells the engine to stop a build or push, so a
        cancelled caller really stops the work (aiodocker's helpers leave it open). A
        stream left before its end is cut at once (see _CutOnClose).
        """
        timeout = aiohttp.ClientTimeout(total=None, connect=self._timeout, sock_read=None)
        async with contextlib.AsyncExitStack() as stack:
            async with asyncio.timeout(idle_timeout):  # waiting for the answer counts as idle
                response = await stack.enter_async_context(
                    self._docker._query(  # the helpers never close the stream
                        path,
                        "POST",
                        params=dict(params),
                        headers=headers,
                        data=data,
                        timeout=timeout,
                    )
                )
            try:
                while True:
                    async with asyncio.timeout(idle_timeout):
                        raw = await response.content.readline()
                    if not raw:
                        return
                    if raw.strip():
                        yield _checked(json.loads(raw))
            finally:
                response.close()

    def _deadline(self, what: str) -> _Deadline:
        return _Deadline(self._timeout, f"Docker Engine at {self.url} did not answer {what}")


class _Deadline:
    """`asyncio.timeout` that turns expiry into an EngineError that says what hung."""

    def __init__(self, seconds: float, message: str) -> None:
        self._timeout = asyncio.timeout(seconds)
        self._message = message

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await self._timeout.__aexit__(*exc_info)
        except TimeoutError:
            raise EngineError(self._message) from None


class _BuildLog:
    """Turns the engine's build stream into build events and remembers the log's tail.

    BuildKit's progress comes as trace messages; the classic builder's as fragments of
    text, joined here into lines."""

    def __init__(self, on_event: BuildSink) -> None:
        self._on_event = on_event
        self._trace = TraceDecoder()
        self._partial = ""
        self.tail: list[str] = []
        self.image_id: str | None = None

    async def feed(self, item: Mapping[str, Any]) -> None:
        aux = item.get("aux")
        if item.get("id") == TRACE_ID:
            for event in self._trace.feed(aux):
                await self._emit(event)
            return
        if isinstance(aux, Mapping) and isinstance(aux.get("ID"), str):
            self.image_id = aux["ID"]
        text = item.get("stream") or item.get("status")
        if isinstance(text, str):
            self._partial += text if "stream" in item else text + "\n"
            *lines, self._partial = self._partial.split("\n")
            for line in lines:
                await self._line(line)

    async def flush(self) -> None:
        for event in self._trace.flush():
            await self._emit(event)
        if self._partial:
            await self._line(self._partial)
            self._partial = ""

    async def _line(self, line: str) -> None:
        line = line.rstrip()
        if line:
            await self._emit(BuildLine(line))

    async def _emit(self, event: BuildEvent) -> None:
        text = plain(event_type(event), event.fields())
        if text:
            self.tail = [*self.tail[-(BUILD_LOG_TAIL - 1) :], text]
        await self._on_event(event)


class _CutOnClose(ResponseHandler):
    """An engine connection that aiohttp lets go of is cut, never closed gracefully.

    A graceful close first sends what the transport still holds: the rest of a build
    context whose upload was given up (a cancel, a deadline, an early answer from the
    engine). An engine that reads no more of it leaves the socket open, closing, for as
    long as the process lives; and a connection given up is of no more use anyway.
    aiohttp closes the connections it gives up, and those it no longer keeps, here.
    """

    def close(self) -> None:
        self.abort()


class _StreamError(Exception):
    """The engine reported an error inside a progress stream."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _checked(item: dict[str, Any]) -> dict[str, Any]:
    if "error" in item or "errorDetail" in item:
        detail = item.get("errorDetail")
        message = (detail.get("message") if isinstance(detail, dict) else None) or item.get("error")
        raise _StreamError(str(message or "the engine reported an unnamed error").strip())
    return item


async def _read_file(path: Path) -> AsyncIterator[bytes]:
    """The file's bytes, read off the event loop."""
    with path.open("rb") as f:
        while chunk := await asyncio.to_thread(f.read, 1024 * 1024):
            yield chunk


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _digest_of(item: Mapping[str, Any]) -> str | None:
    aux = item.get("aux")
    if isinstance(aux, Mapping) and isinstance(aux.get("Digest"), str):
        return str(aux["Digest"])
    match = _DIGEST_LINE.search(str(item.get("status", "")))
    return match.group(1) if match else None


def _progress_of(item: Mapping[str, Any]) -> PushProgress:
    detail = item.get("progressDetail") or {}
    return PushProgress(
        layer=str(item["id"]),
        status=str(item["status"]),
        current=detail.get("current"),
        total=detail.get("total"),
    )


def _engine_or_registry(exc: aiodocker.DockerError, repository: str | None = None) -> EngineError:
    if exc.status == 900:  # aiodocker: the engine's socket did not answer
        return EngineError(str(exc.message))
    return classify_registry_error(str(exc.message).strip(), repository)
