"""The command line, run as the installed `deploy-agent` script against a real leader."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pty
import re
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.cli import commands
from agent.cli.client import Client, Target
from agent.cli.deploy import _git_url, follow
from agent.cli.inputs import InputError
from agent.cli.main import STATES, _parser
from agent.leader.state.models import State
from tests.support.contexts import busybox_context, features_context, run_step
from tests.support.dockerd import Dockerd
from tests.support.leader import InProcessLeader, LeaderProcess
from tests.support.loopback import serving
from tests.support.procs import free_port
from tests.support.registry import Registry

SCRIPT = str(Path(sys.executable).parent / "deploy-agent")


async def _cli(
    leader: InProcessLeader | None,
    *args: str,
    stdin: bytes = b"",
    extra_env: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    env = dict(os.environ) | (extra_env or {})
    if leader is not None:
        env |= {"DEPLOY_AGENT_URL": leader.api.base_url, "DEPLOY_AGENT_TOKEN": leader.api.token}
    proc = await asyncio.create_subprocess_exec(
        SCRIPT,
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_version_and_check_config(tmp_path: Path) -> None:
    """--version prints the package version; check-config exits 0 or 2 naming the key."""
    code, out, _ = await _cli(None, "--version")
    assert code == 0 and out.startswith("deploy-agent ")
    good = tmp_path / "good.toml"
    good.write_text(
        'role = "leader"\n[leader]\napi_token = "0123456789abcdef"\nplain_http = true\n'
    )
    assert (await _cli(None, "check-config", "-c", str(good)))[0] == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text() + "max_parallel_builds = -1\n")
    code, _, err = await _cli(None, "check-config", "-c", str(bad))
    assert code == 2
    assert "leader.max_parallel_builds" in err
    worse = tmp_path / "worse.toml"
    worse.write_text(bad.read_text() + 'keep_images = "many"\n[engine]\ntimeout = 0\n')
    code, _, err = await _cli(None, "check-config", "-c", str(worse))
    assert code == 2
    problems = [line for line in err.splitlines() if line.startswith("deploy-agent: config error:")]
    assert [p.split(": ")[2] for p in problems] == [
        "engine.timeout",
        "leader.max_parallel_builds",
        "leader.keep_images",
    ], err


async def test_check_config_notes_a_secret_set_only_in_the_services_environment(
    tmp_path: Path,
) -> None:
    """api_token_env names a variable this shell lacks (the unit's environment sets it):
    check-config passes and says which variable the service must have; a secret file
    that is not there is still an error."""
    config = tmp_path / "leader.toml"
    config.write_text(
        'role = "leader"\n[leader]\nplain_http = true\napi_token_env = "SET_ONLY_IN_THE_UNIT"\n'
    )
    code, out, err = await _cli(None, "check-config", "-c", str(config))
    assert code == 0, out + err
    assert "leader.api_token_env: SET_ONLY_IN_THE_UNIT is not set here" in err

    config.write_text(
        f'role = "leader"\n[leader]\nplain_http = true\napi_token_file = "{tmp_path / "missing"}"\n'
    )
    code, _, err = await _cli(None, "check-config", "-c", str(config))
    assert code == 2 and "leader.api_token_file" in err, err

    worker = tmp_path / "worker.toml"
    worker.write_text(
        'role = "worker"\n[worker]\nleader_url = "https://leader:7443"\n'
        'join_token_env = "SET_ONLY_IN_THE_UNIT"\n'
    )
    code, out, err = await _cli(None, "check-config", "-c", str(worker))
    assert code == 0, out + err
    assert "worker.join_token_env: SET_ONLY_IN_THE_UNIT is not set here" in err


async def test_deploy_follows_the_build_to_success(leader: InProcessLeader, tmp_path: Path) -> None:
    """`deploy --context` streams the stages and build log, ends with a summary and exit 0."""
    context = busybox_context(tmp_path / "app", run_step("echo cli-build-line"))

    code, out, err = await _cli(leader, "deploy", "--app", "cli", "--context", str(context))

    assert code == 0, out + err
    assert "==> building" in out
    assert "cli-build-line" in out
    assert ": succeeded" in out
    assert "building:" in out  # the per-stage timing in the summary
    code, out, _ = await _cli(leader, "status", "--app", "cli")
    assert code == 0 and "succeeded" in out


async def test_deploy_failure_exits_1_with_code_and_hint(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """A failed build ends the command with exit 1, the error code, the log tail (the
    failing step's output, numbered as BuildKit's plain progress numbers it) and a hint."""
    context = busybox_context(tmp_path / "app", run_step("echo cli-oops; exit 1"))

    code, out, _ = await _cli(leader, "deploy", "--app", "cli", "--context", str(context))

    assert code == 1
    assert "error: build_failed" in out
    assert re.search(r"\| #\d+ cli-oops", out), out
    assert "hint:" in out


async def test_registry_set_reads_the_password_from_stdin(
    leader: InProcessLeader, registry: Registry
) -> None:
    """`registry set` takes the password on stdin (never argv) and `show` never prints it."""
    code, out, err = await _cli(
        leader,
        "registry",
        "set",
        "--server",
        registry.host,
        "--username",
        registry.username,
        stdin=registry.password.encode() + b"\n",
    )
    assert code == 0, err
    code, out, _ = await _cli(leader, "registry", "show")
    assert code == 0
    assert registry.host in out
    assert registry.password not in out


async def test_a_closed_stdout_is_not_a_leader_error(leader: InProcessLeader) -> None:
    """`deploy-agent registry show | head` with the reader gone exits quietly, blaming no leader."""
    env = os.environ | {
        "DEPLOY_AGENT_URL": leader.api.base_url,
        "DEPLOY_AGENT_TOKEN": leader.api.token,
    }
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = await asyncio.create_subprocess_exec(
        SCRIPT, "registry", "show", env=env, stdout=write_end, stderr=asyncio.subprocess.PIPE
    )
    os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert err.decode() == ""


async def test_unreachable_leader_is_a_clear_error(tmp_path: Path) -> None:
    """With no leader listening, the command says it cannot reach it and exits 2."""
    token = tmp_path / "token"
    token.write_text("some-token\n")
    code, _, err = await _cli(
        None, "status", "--url", "http://127.0.0.1:9", "--token-file", str(token)
    )
    assert code == 2, err
    assert "cannot reach the leader" in err


async def test_join_token_and_nodes_commands(
    leader_factory: Any, worker_engines: list[Any], worker_process: Any
) -> None:
    """`join-token` prints a token a worker enrols with; `nodes` lists it connected."""
    leader = await leader_factory(leader={"plain_http": None})
    ca = str(Path(leader.config.state_dir) / "tls" / "ca.pem")
    env_ca = {"DEPLOY_AGENT_CA": ca}
    code, token, err = await _cli(leader, "join-token", extra_env=env_ca)
    assert code == 0, err
    assert token.startswith("DAT1-")
    worker_process("cli-node", worker_engines[0], leader.url, token.strip()).start()
    await leader.api.wait_nodes(**{"cli-node": True})

    code, out, err = await _cli(leader, "nodes", extra_env=env_ca)

    assert code == 0, err
    assert "cli-node" in out and "connected" in out


async def _cli_on_tty(
    leader: InProcessLeader,
    *args: str,
    interrupt_on: str | None = None,
    answer: tuple[str, bytes] | None = None,
) -> tuple[int, str]:
    """Run the command with its output on a pseudo-terminal, as a person would see it;
    press Ctrl-C once `interrupt_on` has appeared on the screen. With `answer` (a prompt
    and what to type), its input is the terminal too."""
    primary, secondary = pty.openpty()
    env = dict(os.environ) | {
        "DEPLOY_AGENT_URL": leader.api.base_url,
        "DEPLOY_AGENT_TOKEN": leader.api.token,
        "COLUMNS": "120",
        "TERM": "xterm",
    }
    proc = await asyncio.create_subprocess_exec(
        SCRIPT,
        *args,
        env=env,
        stdin=secondary if answer else asyncio.subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
    )
    os.close(secondary)
    screen = _Screen(primary)
    try:
        if answer is not None:
            await asyncio.wait_for(screen.shows(answer[0]), 60)
            os.write(primary, answer[1])
        if interrupt_on is not None:
            await asyncio.wait_for(screen.shows(interrupt_on), 60)
            proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 120)
        await screen.closed.wait()
    finally:
        screen.close()
    return code, screen.text()


class _Screen:
    """What the command wrote to its terminal, read as it arrives."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.chunks: list[bytes] = []
        self.changed = asyncio.Event()
        self.closed = asyncio.Event()
        asyncio.get_running_loop().add_reader(fd, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # the other side closed: EIO on a pty
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(self.fd)
            self.closed.set()
        self.chunks.append(chunk)
        self.changed.set()

    async def shows(self, marker: str) -> None:
        while marker not in self.text():
            self.changed.clear()
            await self.changed.wait()

    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


async def test_deploy_on_a_terminal_shows_stages_and_a_summary_table(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """On a TTY the live view prints the stages, the build log and a summary table."""
    context = busybox_context(tmp_path / "app", run_step("echo tty-build-line"))

    code, out = await _cli_on_tty(leader, "deploy", "--app", "tty", "--context", str(context))

    assert code == 0, out
    assert "==> building" in out
    assert "tty-build-line" in out
    assert "succeeded" in out and "image" in out and "building" in out


async def test_every_build_feature_deploys_from_the_cli_with_its_steps_live(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """A Dockerfile with parallel stages, a build argument, COPY --chmod and --link and a
    cache mount deploys from `deploy-agent deploy` on a terminal, which shows each step
    as buildx's plain progress does: its number and name, its output, DONE and its time."""
    context = features_context(tmp_path / "app", cache_id=f"cli-{os.urandom(4).hex()}")

    code, out = await _cli_on_tty(
        leader, "deploy", "--app", "live", "--context", str(context), "--build-arg", "GREETING=hi"
    )

    assert code == 0, out
    assert "building with buildkit" in out
    assert re.search(r"#\d+ \[left 1/1\] RUN", out), out
    assert re.search(r"#\d+ left-start", out), out
    assert re.search(r"#\d+ DONE \d+\.\ds", out), out
    assert re.search(r"#\d+ greeting=hi", out), out
    # Engine 20.10's Dockerfile frontend predates --link: the leader took it off
    assert re.search(r"#\d+ \[stage-4 4/5\] COPY (--link )?data.txt", out), out


async def test_target_from_the_cli_builds_that_stage_and_prints_plain_steps(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """`--target test` builds the test stage; without a terminal the steps are plain lines."""
    context = features_context(tmp_path / "app", cache_id=f"tgt-{os.urandom(4).hex()}")

    code, out, _ = await _cli(
        leader, "deploy", "--app", "tgt", "--context", str(context), "--target", "test"
    )

    assert code == 0, out
    assert "stage test" in out
    assert re.search(r"^    #\d+ \[test 1/1\] RUN", out, re.MULTILINE), out
    assert "[left " not in out


async def test_ctrl_c_detaches_and_the_deployment_goes_on(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """Ctrl-C during a build detaches (exit 130); the deployment still succeeds."""
    context = busybox_context(tmp_path / "app", run_step("echo detach-me; sleep 3"))

    code, out = await _cli_on_tty(
        leader, "deploy", "--app", "detach", "--context", str(context), interrupt_on="detach-me"
    )

    assert code == 130, out
    assert "detached" in out
    _, listing = await leader.api.request("GET", "/v1/deployments?app=detach")
    final = await leader.api.wait_final(listing["deployments"][0]["id"])
    assert final["state"] == "succeeded"


async def test_sighup_is_logged_and_ignored(leader_process: Callable[..., LeaderProcess]) -> None:
    """SIGHUP's default would end the leader at once, undrained, as a clean exit that
    systemd does not restart: it is logged and the leader serves on."""
    leader = leader_process()
    leader.start()
    assert leader.proc is not None
    leader.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.5)

    status, _ = await leader.api.request("GET", "/v1/cluster")
    assert status == 200
    assert "agent.sighup_ignored" in leader.log_text()
    assert leader.terminate() == 0


async def test_a_leader_that_cannot_listen_says_why_and_exits_1(
    leader_process: Callable[..., LeaderProcess],
) -> None:
    """Its port taken: `run` logs agent.failed with the reason and exits 1, not 2 with
    the client commands' "cannot reach the leader"."""
    leader = leader_process()
    host, _, port = leader.raw["leader"]["listen"].rpartition(":")
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()
        code, out, err = await _cli(
            None, "run", "-c", str(leader.config_path), extra_env=leader.secret_env
        )
    assert code == 1, out + err
    assert "agent.failed" in out + err and "address already in use" in out + err
    assert "cannot reach the leader" not in out + err


def test_flags_before_a_nested_command_are_kept() -> None:
    """`nodes --url U revoke ID` talks to U: the nested command's own copies of the flags
    do not reset what the parent set (it fell back to another leader before)."""
    args = _parser().parse_args(["nodes", "--url", "https://leader:7443", "revoke", "n-1"])
    assert (args.url, args.id) == ("https://leader:7443", "n-1")
    args = _parser().parse_args(["nodes", "revoke", "--url", "https://other:7443", "n-2"])
    assert args.url == "https://other:7443"


async def test_an_answer_that_is_not_json_is_reported_not_a_traceback() -> None:
    """A proxy's HTML error page in front of the leader: the command says so and exits
    1, instead of a JSONDecodeError traceback."""

    async def proxy_error(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html><h1>502 Bad Gateway</h1></html>")

    async for url in serving(proxy_error, "/v1/deployments"):
        code, _, err = await _cli(
            None, "status", "--url", url, extra_env={"DEPLOY_AGENT_TOKEN": "t"}
        )
    assert code == 1, err
    assert "502: the answer is not JSON: <html><h1>502 Bad Gateway</h1></html>" in err
    assert "Traceback" not in err


async def test_a_config_error_found_while_running_exits_2(dockerd: Dockerd, tmp_path: Path) -> None:
    """A worker with no identity whose join token file is missing: `run` logs
    agent.failed naming the key and exits 2, which its unit does not restart (a
    restart every 5 s cannot mend a config)."""
    config = tmp_path / "worker.toml"
    config.write_text(
        f'role = "worker"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[engine]\nurl = "{dockerd.url}"\n'
        f'[worker]\nleader_url = "http://127.0.0.1:9"\n'
        f'join_token_file = "{tmp_path / "missing-token"}"\n'
    )
    code, out, err = await _cli(None, "run", "-c", str(config))
    assert code == 2, out + err
    assert "agent.failed" in out and "worker.join_token_file" in out


FILE_MISTAKES = {
    "token-file-missing": ("status", "--token-file", None, "No such file or directory"),
    "services-not-json": ("deploy", "--services", "[{not json", "not JSON"),
    "services-not-a-list": ("deploy", "--services", '{"name": "web"}', "a JSON list"),
    "git-password-file-empty": ("deploy", "--git-password-file", "", "the file is empty"),
    "ca-file-not-a-certificate": ("status", "--ca-file", "not a certificate", "--ca-file"),
}


@pytest.mark.parametrize("case", FILE_MISTAKES.keys())
async def test_a_file_a_flag_names_that_cannot_be_used_is_named(case: str, tmp_path: Path) -> None:
    """A missing, empty or malformed file given to a flag: exit 2 with the flag and the
    file named, not "cannot reach the leader" and not a traceback."""
    command, flag, content, says = FILE_MISTAKES[case]
    path = tmp_path / "given"
    if content is not None:
        path.write_text(content)
    args = [command, "--url", "https://127.0.0.1:9", flag, str(path)]
    if command == "deploy":
        args += ["--app", "web", "--git", "https://git.example/r.git"]
    code, _, err = await _cli(None, *args, extra_env={"DEPLOY_AGENT_TOKEN": "t"})
    assert code == 2, err
    assert f"{flag} {path}" in err and says in err, err
    assert "Traceback" not in err and "cannot reach the leader" not in err


def test_a_ca_file_that_cannot_be_used_is_named_as_it_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA from DEPLOY_AGENT_CA is named so, not as a --ca-file nobody gave."""
    missing = tmp_path / "ca.pem"
    monkeypatch.setenv("DEPLOY_AGENT_CA", str(missing))
    monkeypatch.setenv("DEPLOY_AGENT_TOKEN", "t")
    target = Target.resolve("https://leader:7443", None, None, None)
    with pytest.raises(InputError, match=re.escape(f"DEPLOY_AGENT_CA {missing}: No such file")):
        Client(target)


async def test_a_redirecting_url_is_refused_without_following_or_showing_the_token() -> None:
    """A proxy or ingress that redirects (here, to itself, forever): the command names
    the redirect and exits 1; it neither follows it with the API token nor prints the
    token (a client error's repr holds the request's headers)."""
    token = "canary-cli-token-never-shown"
    seen: list[str] = []

    async def redirecting(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        raise web.HTTPFound(str(request.url))

    async for url in serving(redirecting, "/v1/deployments"):
        code, out, err = await _cli(
            None, "status", "--url", url, extra_env={"DEPLOY_AGENT_TOKEN": token}
        )
    assert code == 1, err
    assert "redirects to" in err and "the leader's own URL" in err
    assert token not in out + err
    assert len(seen) == 1


@pytest.mark.parametrize("listen", ["[::1]", "::"], ids=["ipv6-loopback", "ipv6-wildcard"])
async def test_the_config_finds_a_leader_listening_on_ipv6(
    leader_factory: Callable[..., Any], listen: str
) -> None:
    """A leader whose listen is an IPv6 address (in brackets or not) or the IPv6
    wildcard is reached through -c: the URL brackets the address, and a wildcard maps to
    ::1, since an IPv6 listener takes no IPv4 connection."""
    leader = await leader_factory(leader={"listen": f"{listen}:{free_port()}"})
    target = Target.resolve(None, None, leader.config, None)
    assert target.url.startswith("http://[::1]:")

    async with Client(target) as client:
        cluster = await client.call("GET", "/v1/cluster")
    assert cluster["mode"] == "local"


async def test_a_config_whose_secrets_come_from_the_service_environment_serves_the_cli(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """`-c` a leader config whose API token and registry password come from variables
    set only in the service's environment: with DEPLOY_AGENT_TOKEN given, the command
    line reads the config for the leader's address and calls it, instead of failing on
    secrets it does not need."""
    config = tmp_path / "config.toml"
    config.write_text(
        f'role = "leader"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[leader]\nlisten = "{leader.config.leader.listen}"\nplain_http = true\n'  # type: ignore[union-attr]
        'api_token_env = "ONLY_IN_THE_SERVICE_ENVIRONMENT"\n'
        '[registry]\nserver = "r.example"\nusername = "u"\n'
        'password_env = "ONLY_IN_THE_SERVICE_ENVIRONMENT_TOO"\n'
    )
    code, out, err = await _cli(
        None, "status", "-c", str(config), extra_env={"DEPLOY_AGENT_TOKEN": leader.api.token}
    )
    assert code == 0, out + err

    code, _, err = await _cli(None, "status", "-c", str(config))
    assert code == 2 and "leader.api_token_env" in err, err  # no token given: it is needed


async def test_the_default_config_is_not_read_when_the_leader_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --url and DEPLOY_AGENT_TOKEN, an installed leader config is left alone;
    without --url it is read for the leader's address, and the token given stands (the
    config's own comes from the service's environment, not set here)."""
    installed = tmp_path / "config.toml"
    installed.write_text(
        'role = "leader"\n[leader]\nlisten = "0.0.0.0:7070"\nplain_http = true\n'
        'api_token_env = "ONLY_IN_THE_SERVICE_ENVIRONMENT"\n'
    )
    monkeypatch.setattr(commands, "DEFAULT_CONFIG", str(installed))
    monkeypatch.setenv("DEPLOY_AGENT_TOKEN", "t")
    monkeypatch.delenv("ONLY_IN_THE_SERVICE_ENVIRONMENT", raising=False)
    flags = argparse.Namespace(url="http://leader:7070", token_file=None, config=None, ca_file=None)

    async with commands.client_for(flags):
        pass
    async with commands.client_for(argparse.Namespace(**{**vars(flags), "url": None})) as client:
        assert (client._target.url, client._target.token) == ("http://127.0.0.1:7070", "t")


async def test_a_password_typed_at_a_terminal_is_asked_for_and_not_echoed(
    leader: InProcessLeader, registry: Registry
) -> None:
    """`registry set` on a terminal prompts for the token and keeps it off the screen."""
    typed = (registry.password + "\n").encode()
    args = ("registry", "set", "--server", registry.host, "--username", registry.username)
    code, screen = await _cli_on_tty(leader, *args, answer=("password or token:", typed))

    assert code == 0, screen
    assert registry.password not in screen
    assert '"version": 1' in screen


RESTART_EVENTS = (
    {"seq": 1, "type": "state", "state": "queued"},
    {"seq": 2, "type": "state", "state": "building"},
    {"seq": 3, "type": "resumed", "attempt": 2},
    {"seq": 4, "type": "state", "state": "succeeded"},
)


class RestartingLeader:
    """Serves a deployment's events: the first stream is cut after two events (the leader
    went away), the next replays them all to the final state."""

    def __init__(self) -> None:
        self.streams = 0

    async def events(self, request: web.Request) -> web.StreamResponse:
        self.streams += 1
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        upto = 2 if self.streams == 1 else len(RESTART_EVENTS)
        for event in RESTART_EVENTS[:upto]:
            await response.write(json.dumps(event).encode() + b"\n")
        if self.streams == 1:
            assert request.transport is not None
            request.transport.abort()  # mid-stream, no end of the chunked body
            return response
        await response.write_eof()
        return response

    async def deployment(self, request: web.Request) -> web.Response:
        return web.json_response({"id": "d-1", "state": "succeeded", "error": None})


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None

    def event(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def summary(self, dep: dict[str, Any]) -> None:
        self.final = dep


async def test_following_survives_a_leader_restart_and_prints_each_event_once() -> None:
    """The event stream breaks (the leader restarted; its deployments resume): `deploy`
    follows again and prints the replayed events only once, to the final state."""
    leader = RestartingLeader()

    async def route(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/events"):
            return await leader.events(request)
        return await leader.deployment(request)

    recorder = Recorder()
    async for url in serving(route, "/v1/deployments/{tail:.*}"):
        async with Client(Target(url, "t")) as client:
            final = await asyncio.wait_for(follow(client, "d-1", recorder), 30)

    assert leader.streams == 2
    assert [e["seq"] for e in recorder.events] == [1, 2, 3, 4]
    assert final["state"] == "succeeded" and recorder.final == final


def test_a_git_token_comes_from_a_file_or_the_environment_not_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`deploy --git URL --git-password-file F` sends the token in the request body's URL
    (the leader keeps it in its store and out of every answer); a URL that already holds
    one gets a warning that the process list shows it."""
    secret = tmp_path / "git-token"
    secret.write_text("glpat-s3cr/t\n")
    monkeypatch.delenv("DEPLOY_AGENT_GIT_PASSWORD", raising=False)
    url = "https://deploy@git.example.com:8443/acme/api.git"
    assert (
        _git_url(url, str(secret))
        == "https://deploy:glpat-s3cr%2Ft@git.example.com:8443/acme/api.git"
    )
    monkeypatch.setenv("DEPLOY_AGENT_GIT_PASSWORD", "from-env")
    assert (
        _git_url("https://git.example.com/r.git", None)
        == "https://git:from-env@git.example.com/r.git"
    )
    assert capsys.readouterr().err == ""

    given = "https://u:visible@git.example.com/r.git"
    assert _git_url(given, None) == given
    assert "process list" in capsys.readouterr().err


def _every_parser(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _every_parser(sub)
    return found


def test_every_command_and_flag_has_help_text() -> None:
    """`--help` explains every flag and argument of every command, and the top level
    describes the product, not a module of its code."""
    top = _parser()
    missing = [
        f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        for parser in _every_parser(top)
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not action.help
    ]
    assert missing == [], missing
    assert "Entry point" not in (top.description or "")
    registry = next(p for p in _every_parser(top) if p.prog.endswith(" registry"))
    assert all(word in registry.format_help() for word in ("set", "show", "remove"))


@pytest.mark.parametrize("case", ["missing", "a-file"])
async def test_a_context_that_is_no_directory_is_a_usage_error_naming_the_flag(
    case: str, tmp_path: Path
) -> None:
    """`deploy --context` with a path that is not a directory exits 2 naming --context
    and the path, before any call to the leader (none listens at the URL given)."""
    path = tmp_path / "context"
    if case == "a-file":
        path.write_text("not a directory")
    args = ["deploy", "--url", "http://127.0.0.1:9", "--app", "web", "--context", str(path)]
    code, _, err = await _cli(None, *args, extra_env={"DEPLOY_AGENT_TOKEN": "t"})
    assert code == 2, err
    assert f"--context {path}: " in err, err
    assert "cannot reach the leader" not in err and "Traceback" not in err


async def test_status_and_nodes_print_a_header_or_say_there_is_nothing(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """With nothing to list, `status` and `nodes` say so in words; with a deployment,
    `status` prints it under a header line."""
    code, out, err = await _cli(leader, "status")
    assert (code, out) == (0, "no deployments\n"), err
    code, out, err = await _cli(leader, "status", "--app", "web", "--state", "failed")
    assert (code, out) == (0, "no deployments of app web in state failed\n"), err
    code, out, err = await _cli(leader, "nodes")
    assert code == 0 and out.startswith("no workers enrolled"), out + err

    context = busybox_context(tmp_path / "app")
    code, _, err = await _cli(leader, "deploy", "--app", "web", "--context", str(context))
    assert code == 0, err
    code, out, err = await _cli(leader, "status")
    header, row = out.splitlines()
    assert header.split() == ["ID", "APP", "STATE", "MODE", "IMAGE", "ERROR"]
    assert row.split()[1:4] == ["web", "succeeded", "local"]


async def test_a_failed_git_deploy_reads_plainly_and_names_no_image(
    leader: InProcessLeader,
) -> None:
    """Without a terminal, a git deployment whose clone fails prints its source as words
    (not a Python dict), ends with exit 1 and names no image, since none was built."""
    url = f"https://127.0.0.1:{free_port()}/acme/api.git"

    code, out, err = await _cli(leader, "deploy", "--app", "api", "--git", url, "--ref", "main")

    assert code == 1, out + err
    assert f"    cloning {url} at main\n" in out, out
    assert "  image: none (not built)\n" in out, out
    assert "error: source_unavailable" in out
    assert not re.search(r"\{'\w+': ", out), out  # a Python dict's repr


async def test_a_build_log_with_brackets_shows_as_written_on_a_terminal(
    leader: InProcessLeader, tmp_path: Path
) -> None:
    """On a terminal a build log line holding `[red]…[/]` is shown as the build wrote
    it, no line is wrapped in visible markup, and the summary has no empty header row."""
    context = busybox_context(tmp_path / "app", run_step("echo '[red]as-written[/]'"))

    code, out = await _cli_on_tty(leader, "deploy", "--app", "tty", "--context", str(context))

    assert code == 0, out
    assert "[red]as-written[/]" in out, out
    assert "[dim]" not in out and "[bold" not in out, out
    assert "┃" not in out, out  # rich's heavy line under a header row
    assert "image" in out and "succeeded" in out


async def test_check_config_warns_of_a_token_file_every_user_can_read(tmp_path: Path) -> None:
    """check-config passes a config whose API token file is mode 0644, and warns that
    every user of the host can read it, with the fix; at 0600 it says nothing of it."""
    token = tmp_path / "api-token"
    token.write_text("0123456789abcdef0123\n")
    config = tmp_path / "leader.toml"
    config.write_text(f'role = "leader"\n[leader]\nplain_http = true\napi_token_file = "{token}"\n')
    token.chmod(0o644)
    code, _, err = await _cli(None, "check-config", "-c", str(config))
    assert code == 0, err
    assert f"leader.api_token_file {token} is mode 0644" in err and "chmod 600" in err
    token.chmod(0o600)
    code, _, err = await _cli(None, "check-config", "-c", str(config))
    assert code == 0 and err == "", err


def test_status_offers_the_states_a_deployment_has() -> None:
    """`status --state` offers exactly the leader's deployment states."""
    assert set(STATES) == {state.value for state in State}
