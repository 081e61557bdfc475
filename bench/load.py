"""Load on one engine: N deployments of 20 apps submitted at once, all on one base image.

    python -m bench.load [--deployments 200] [--apps 20] [--runs 3]

A real `deploy-agent run` leader in local mode on its own real Docker Engine, with the
default `max_parallel_builds` and `keep_images`: retention removes each app's older
images while the other apps build on the same engine. Every context is a new revision
(its own `rev.txt`) of an app whose Dockerfile copies a file all apps share, the app's
own file and the revision onto the shared base, so that builds find cached steps that
retention may be removing. Each run uses a fresh leader (state dir) on the same engine.

Reported per run: deployments by final state (and the error codes of the failed), the
time from the first submission to the last final state, and the leader's RSS before the
submissions, its peak (VmHWM) and after the run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.scratch import scratch_dir
from tests.support.api import tar_of
from tests.support.contexts import busybox_context
from tests.support.dockerd import Dockerd
from tests.support.leader import LeaderProcess, leader_config
from tests.support.load import status_kib, submit, wait_all_final


def base_image(engine: Dockerd, root: Path) -> str:
    tag = f"load-base:{uuid.uuid4().hex[:8]}"
    engine.cli("build", "-t", tag, str(busybox_context(root / "base")))
    return tag


def revision(root: Path, base: str, app: str, rev: int) -> bytes:
    """Revision `rev` of `app`: the shared file, the app's own, then the revision's."""
    context = root / f"{app}-{rev}"
    context.mkdir(parents=True)
    (context / "shared.txt").write_text("shared by every app\n")
    (context / "app.txt").write_text(f"{app}\n")
    (context / "rev.txt").write_text(f"{app} {rev} {uuid.uuid4().hex}\n")
    (context / "Dockerfile").write_text(
        f"FROM {base}\nCOPY rev.txt /rev.txt\nCOPY shared.txt /shared.txt\n"
        f'COPY app.txt /app.txt\nCMD ["/bin/busybox", "cat", "/rev.txt"]\n'
    )
    body = tar_of(context)
    shutil.rmtree(context)
    return body


async def one_run(
    args: argparse.Namespace, engine: Dockerd, work: Path, run: int
) -> dict[str, Any]:
    base = base_image(engine, work)
    prefix = f"r{run}{uuid.uuid4().hex[:4]}"
    apps = [f"{prefix}app{i}" for i in range(args.apps)]
    bodies = [
        (apps[i % args.apps], revision(work / "ctx", base, apps[i % args.apps], i))
        for i in range(args.deployments)
    ]
    state = work / f"leader-{run}"
    state.mkdir()
    raw = leader_config(state / "state", engine.url, leader={"stage_timeouts": None})
    leader = LeaderProcess(raw, state)
    await asyncio.to_thread(leader.start)
    assert leader.proc is not None
    try:
        await asyncio.sleep(2)
        before = status_kib(leader.proc.pid, "VmRSS")
        started = time.monotonic()
        ids = await asyncio.gather(*(submit(leader.api, app, body) for app, body in bodies))
        done = await wait_all_final(leader.api, apps, set(ids), args.timeout)
        elapsed = time.monotonic() - started
        await leader.api.drop_connections()
        await asyncio.sleep(2)
        peak = status_kib(leader.proc.pid, "VmHWM")
        after = status_kib(leader.proc.pid, "VmRSS")
    finally:
        await leader.api.close()
        await asyncio.to_thread(leader.terminate)
    states = collections.Counter(d["state"] for d in done.values())
    errors = collections.Counter(
        d["error"]["code"] for d in done.values() if d["state"] == "failed" and d.get("error")
    )
    messages = sorted({d["error"]["message"][:160] for d in done.values() if d.get("error")})
    return {
        "run": run,
        "deployments": args.deployments,
        "apps": args.apps,
        "states": dict(states),
        "errors": dict(errors),
        "messages": messages[:5],
        "seconds": round(elapsed, 1),
        "rss_kib": {"before": before, "peak": peak, "after": after},
    }


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    with scratch_dir("bench-load-") as work:
        engine = Dockerd()
        await asyncio.to_thread(engine.start)
        try:
            for run in range(1, args.runs + 1):
                result = await one_run(args, engine, work, run)
                print(json.dumps(result), flush=True)
                results.append(result)
        finally:
            await asyncio.to_thread(engine.stop)
    return results


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("--deployments", type=int, default=200)
    parser.add_argument("--apps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds")
    return parser.parse_args(argv)


if __name__ == "__main__":
    outcomes = asyncio.run(main(parse(sys.argv[1:])))
    sys.exit(0 if all(r["states"] == {"succeeded": r["deployments"]} for r in outcomes) else 1)
