"""`deploy-agent deploy`: pack a directory (or name a git ref), submit, follow to the end."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import io
import json
import os
import signal
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp

from agent.backoff import Backoff
from agent.cli.client import UPLOAD_TIMEOUT, Client, describe
from agent.cli.commands import client_for
from agent.cli.inputs import InputError, first_line, read_text
from agent.cli.live import LivePrinter
from agent.cli.output import event_line, summary_rows
from agent.dockerignore import FILENAME, DockerIgnore, IgnoreFileError, whole_seconds

SKIP = frozenset({".git"})
REFOLLOW_WITHIN_S = 300.0  # how long a leader that went away is waited for


def pack(
    directory: Path, dest: Path, dockerfile: str = "Dockerfile", compress: bool = False
) -> None:
    """Write `directory` as a tar build context (gzip with `compress`), without
    version-control folders and without what its .dockerignore excludes (Docker's
    rules). The Dockerfile and the .dockerignore go whatever the patterns say, as the
    docker CLI sends them: the leader needs the one to build and applies the other again.

    Uncompressed by default, as `docker build` sends a context: compressing costs more
    than it saves on a fast link. An unchanged tree packs to the same bytes (the gzip
    header carries no time), so a retried submission with the same Idempotency-Key is
    recognised.
    """
    try:
        ignore = DockerIgnore.of_directory(directory)
    except IgnoreFileError as exc:
        raise InputError(f"{directory}/{exc.message}") from None
    keep = frozenset({dockerfile, FILENAME})
    with contextlib.ExitStack() as stack:
        out: io.BufferedIOBase = stack.enter_context(dest.open("wb"))
        if compress:
            gzipped = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0)
            out = stack.enter_context(gzipped)
        archive = stack.enter_context(tarfile.open(fileobj=out, mode="w"))
        for path in ignore.walk(directory, keep=keep, skip=SKIP):
            archive.add(directory / path, arcname=path, recursive=False, filter=whole_seconds)


async def submit_directory(
    client: Client,
    directory: Path,
    params: list[tuple[str, str]],
    key: str | None,
    dockerfile: str = "Dockerfile",
    *,
    compress: bool = False,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="deploy-agent-") as tmp:
        archive = Path(tmp) / "context.tar"
        await asyncio.to_thread(pack, directory, archive, dockerfile, compress)
        content_type = "application/gzip" if compress else "application/x-tar"
        with archive.open("rb") as body:
            doc: dict[str, Any] = await client.call(
                "POST",
                "/v1/deployments",
                params=params,
                data=body,
                limits=UPLOAD_TIMEOUT,
                headers={"Content-Type": content_type, **_idempotency(key)},
            )
    return doc


async def submit_git(client: Client, body: dict[str, Any], key: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = await client.call(
        "POST", "/v1/deployments", json_body=body, headers=_idempotency(key)
    )
    return doc


def _idempotency(key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": key} if key else {}


class Printer:
    """Renders events as plain lines for people, or as JSON lines for programs."""

    def __init__(self, out: TextIO = sys.stdout, as_json: bool = False) -> None:
        self._out = out
        self._json = as_json

    def event(self, event: dict[str, Any]) -> None:
        if self._json:
            self._line(json.dumps(event))
            return
        text = event_line(event)
        if text is not None:
            self._line(text if event.get("type") == "state" else f"    {text}")

    def summary(self, dep: dict[str, Any]) -> None:
        if self._json:
            self._line(json.dumps(dep))
            return
        self._line(f"deployment {dep['id']}: {dep['state']}")
        for label, value in summary_rows(dep):
            self._line(f"  {label}: {value}")
        for line in (dep.get("error") or {}).get("log_tail") or []:
            self._line(f"    | {line}")

    def _line(self, text: str) -> None:
        print(text, file=self._out, flush=True)


class EventSink(Protocol):
    def event(self, event: dict[str, Any]) -> None: ...
    def summary(self, dep: dict[str, Any]) -> None: ...


async def follow(client: Client, dep_id: str, printer: EventSink) -> dict[str, Any]:
    """Print the deployment's events to its end, then its summary."""
    await follow_events(client, dep_id, printer.event)
    dep: dict[str, Any] = await client.call("GET", f"/v1/deployments/{dep_id}")
    printer.summary(dep)
    return dep


async def follow_events(
    client: Client,
    stream_id: str,
    on_event: Callable[[dict[str, Any]], None],
    kind: str = "deployments",
) -> None:
    """Hand each event of a deployment (or, with `kind`, an upgrade) to `on_event`, to its
    end. A leader that restarts meanwhile (its work resumes) is followed again; the
    events it replays are not handed on twice."""
    seen = 0
    backoff = Backoff(initial=1.0, cap=10.0)
    lost_since: float | None = None
    while True:
        try:
            async for event in client.events(stream_id, kind):
                lost_since = None
                if event.get("seq", seen + 1) > seen:
                    seen = event.get("seq", seen)
                    on_event(event)
            return
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            now = time.monotonic()
            lost_since = lost_since or now
            if now - lost_since > REFOLLOW_WITHIN_S:
                raise
            delay = backoff.next()
            print(
                f"lost the leader ({describe(exc)}); following again in {delay:.0f} s",
                file=sys.stderr,
            )
            await asyncio.sleep(delay)


def query_params(
    app: str,
    dockerfile: str | None,
    image: str | None,
    build_args: Sequence[str],
    labels: Sequence[str],
    *,
    target: str | None = None,
) -> list[tuple[str, str]]:
    params = [("app", app)]
    params += [("dockerfile", dockerfile)] if dockerfile else []
    params += [("target", target)] if target else []
    params += [("image", image)] if image else []
    params += [("build_arg", item) for item in build_args]
    params += [("label", item) for item in labels]
    return params


async def command(args: argparse.Namespace) -> int:
    if args.context is not None:
        _check_context(args.context)
    async with client_for(args) as client:
        if args.context is not None:
            params = query_params(
                args.app,
                args.dockerfile,
                args.image,
                args.build_arg,
                args.label,
                target=args.target,
            ) + _release_params(args)
            dep = await submit_directory(
                client,
                args.context,
                params,
                args.idempotency_key,
                args.dockerfile or "Dockerfile",
                compress=args.compress,
            )
        else:
            body = _prebuilt_body(args) if args.prebuilt else _git_body(args)
            dep = await submit_git(client, body, args.idempotency_key)
        return await follow_to_exit(client, dep, no_follow=args.no_follow, as_json=args.json)


async def follow_to_exit(
    client: Client, dep: dict[str, Any], *, no_follow: bool, as_json: bool
) -> int:
    """Say the deployment was submitted, follow it live to its end, and give the exit
    code: 0 succeeded, 1 failed or cancelled, 130 detached with Ctrl-C."""
    kind = "" if dep.get("kind", "build") == "build" else f"{dep['kind']}, "
    print(f"deployment {dep['id']} submitted ({kind}{dep['mode']} mode)", file=sys.stderr)
    if no_follow:
        return 0
    final = await _follow_until_done_or_detached(client, dep["id"], as_json)
    if final is None:
        return 130
    return 0 if final["state"] == "succeeded" else 1


def _check_context(path: Path) -> None:
    """A usage error (exit 2) naming the flag, before anything reaches the leader."""
    if not path.exists():
        raise InputError(f"--context {path}: no such directory")
    if not path.is_dir():
        raise InputError(f"--context {path}: not a directory")


async def _follow_until_done_or_detached(
    client: Client, dep_id: str, as_json: bool
) -> dict[str, Any] | None:
    """Follow the deployment; Ctrl-C detaches (and on a terminal offers to cancel)."""
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    tty = sys.stdout.isatty() and not as_json
    with contextlib.ExitStack() as stack:
        printer: EventSink = stack.enter_context(LivePrinter()) if tty else Printer(as_json=as_json)
        following = asyncio.create_task(follow(client, dep_id, printer))
        stop = asyncio.create_task(interrupted.wait())
        await asyncio.wait([following, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        loop.remove_signal_handler(signal.SIGINT)
        if following.done():
            return following.result()
        following.cancel()
    print(f"\ndetached: deployment {dep_id} goes on", file=sys.stderr)
    if sys.stdin.isatty():
        answer = await asyncio.to_thread(input, "cancel it? [y/N] ")
        if answer.strip().lower() in ("y", "yes"):
            doc = await client.call("POST", f"/v1/deployments/{dep_id}/cancel")
            print(f"deployment {dep_id}: {doc['state']}", file=sys.stderr)
    return None


def _services(args: argparse.Namespace) -> list[Any] | None:
    if args.services is None:
        return None
    try:
        services = json.loads(read_text("--services", args.services))
    except ValueError as exc:
        raise InputError(f"--services {args.services}: not JSON ({exc})") from None
    if not isinstance(services, list):
        raise InputError(f"--services {args.services}: must hold a JSON list of services")
    return services


def _release_params(args: argparse.Namespace) -> list[tuple[str, str]]:
    params = []
    services = _services(args)
    if services is not None:
        params.append(("services", json.dumps(services)))
    params += [
        (flag, "true") for flag in ("prune", "allow_manager_placement") if getattr(args, flag)
    ]
    return params


def _git_url(url: str, password_file: str | None) -> str:
    """The git URL with its token, read from a file or the environment, never from the
    command line (where every user of the host sees it in the process list)."""
    parts = urlsplit(url)
    if parts.password:
        print(
            "deploy-agent: warning: the --git URL holds a password, which the process list "
            "shows; use --git-password-file or DEPLOY_AGENT_GIT_PASSWORD",
            file=sys.stderr,
        )
        return url
    password = (
        first_line("--git-password-file", password_file)
        if password_file
        else os.environ.get("DEPLOY_AGENT_GIT_PASSWORD", "").strip()
    )
    if not password:
        return url
    user = quote(parts.username or "git", safe="")
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{user}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _prebuilt_body(args: argparse.Namespace) -> dict[str, Any]:
    """A deployment of an image built elsewhere: no build fields, the release's are kept."""
    return {"app": args.app, "prebuilt": args.prebuilt, **_release_fields(args)}


def _release_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The fields of a JSON submission that say what to release, and how."""
    fields: dict[str, Any] = {}
    services = _services(args)
    if services is not None:
        fields["services"] = services
    fields["prune"] = args.prune
    fields["allow_manager_placement"] = args.allow_manager_placement
    return fields


def _git_body(args: argparse.Namespace) -> dict[str, Any]:
    url = _git_url(args.git, args.git_password_file)
    body: dict[str, Any] = {"app": args.app, "git": {"url": url, "ref": args.ref}}
    if args.dockerfile:
        body["dockerfile"] = args.dockerfile
    if args.target:
        body["target"] = args.target
    if args.image:
        body["image"] = args.image
    body["build_args"] = dict(item.partition("=")[::2] for item in args.build_arg)
    body["labels"] = dict(item.partition("=")[::2] for item in args.label)
    return body | _release_fields(args)
