"""The floor under a fan-out round: the same frames over bare connections, no protocol.

    python -m bench.floor --workers 1000 [--tls] [--rounds 10]

A server in this process, on the leader's event loop and with the leader's TLS settings,
writes the bytes of a pull order's frame to each of N connections at once; clients in
separate processes answer every read with the bytes of a pull result's frame, parsing
nothing. Latency is from the round's first write to the server having read each answer.

What that costs is the machine's: its kernel, the event loop and TLS, before any
websocket or agent code runs. bench.fanout's figures over these are the agent's share.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import uvloop

from agent import wire
from agent.leader.links.frames import text_frame
from agent.tls import ensure_leader_tls
from bench.fanout import IMAGE
from bench.fleet import bench_main, process_cpu_seconds, wait_for
from bench.probe import summary
from bench.simworkers import FIRST_CONNECTS, client_tls, masked_frame, raise_fd_limit

ROUND_TIMEOUT = 120.0
CREDENTIALS = wire.WireCredentials(
    version=1, server="registry.bench:5000", username="bench", password="bench-pw"
)
ORDER_ID = "bench-" + "0" * 12  # as long as bench.fanout's
ORDER = text_frame(
    wire.encode(wire.PullOrder(order=ORDER_ID, image=IMAGE, credentials=CREDENTIALS))
)
ANSWER = masked_frame(wire.encode(wire.PullResult(order=ORDER_ID, image=IMAGE, ok=True)))


class Answers:
    """When each connection's answer to the current round was read."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.at: dict[int, float] = {}
        self.done = asyncio.Event()

    def arrived(self, conn: int) -> None:
        if conn not in self.at:
            self.at[conn] = time.perf_counter()
            if len(self.at) >= self.expected:
                self.done.set()

    def reset(self) -> None:
        self.at = {}
        self.done.clear()


class ServerSide(asyncio.Protocol):
    def __init__(self, answers: Answers, transports: list[asyncio.Transport]) -> None:
        self.answers, self.transports = answers, transports
        self.conn = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn = len(self.transports)
        self.transports.append(cast(asyncio.Transport, transport))  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.answers.arrived(self.conn)


class ClientSide(asyncio.Protocol):
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(ANSWER)


async def serve_clients(port: int, count: int, ca_pem: str | None) -> None:
    """One client process: `count` connections, each answering every read."""
    loop = asyncio.get_running_loop()
    tls = client_tls(ca_pem) or None
    gate = asyncio.Semaphore(FIRST_CONNECTS)

    async def connect() -> None:
        async with gate:
            await loop.create_connection(ClientSide, "127.0.0.1", port, ssl=tls)

    await asyncio.gather(*(connect() for _ in range(count)))
    await asyncio.Event().wait()  # until terminated


def start_clients(args: argparse.Namespace, port: int, ca_file: Path | None) -> list[Any]:
    counts = [len(range(p, args.workers, args.procs)) for p in range(args.procs)]
    command = [sys.executable, "-m", "bench.floor", "--clients-of", str(port)]
    return [
        subprocess.Popen(
            [*command, "--workers", str(n), *(["--ca-file", str(ca_file)] if ca_file else [])],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        )
        for n in counts
        if n
    ]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tls_dir:
        server_tls, ca_file = None, None
        if args.tls:
            leader_tls = ensure_leader_tls(Path(tls_dir), ["127.0.0.1"])
            server_tls, ca_file = leader_tls.server_context(), leader_tls.ca_file
        return await serve(args, server_tls, ca_file)


async def serve(
    args: argparse.Namespace, server_tls: ssl.SSLContext | None, ca_file: Path | None
) -> dict[str, Any]:
    answers = Answers(args.workers)
    transports: list[asyncio.Transport] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: ServerSide(answers, transports), "127.0.0.1", 0, ssl=server_tls, backlog=4096
    )
    clients = start_clients(args, server.sockets[0].getsockname()[1], ca_file)
    try:
        await wait_for(lambda: len(transports) >= args.workers, 300, "every client connected")
        await asyncio.sleep(1.0)
        return await measure(answers, transports, clients, args.rounds)
    finally:
        for client in clients:
            client.terminate()
            client.wait(10)
        server.close()


async def measure(
    answers: Answers, transports: list[asyncio.Transport], clients: list[Any], rounds: int
) -> dict[str, Any]:
    latencies: list[float] = []
    cpu, clients_cpu = os.times(), sum(process_cpu_seconds(c.pid) for c in clients)
    for _ in range(rounds):
        answers.reset()
        started = time.perf_counter()
        for transport in transports:
            transport.write(ORDER)
        async with asyncio.timeout(ROUND_TIMEOUT):
            await answers.done.wait()
        latencies += [at - started for at in answers.at.values()]
        await asyncio.sleep(0.3)
    spent = os.times()
    server_us = (spent.user - cpu.user + spent.system - cpu.system) / len(latencies) * 1e6
    clients_us = (sum(process_cpu_seconds(c.pid) for c in clients) - clients_cpu) * 1e6
    return {
        "round": summary(latencies),
        "server_cpu_us_per_answer": server_us,
        "clients_cpu_us_per_answer": clients_us / len(latencies),
    }


def render(result: dict[str, Any]) -> str:
    s = result["round"]
    mode = "TLS" if result["tls"] else "plain"
    return (
        f"{result['workers']} bare connections, {mode}: pull-order frames answered\n"
        f"  round  n={int(s['n']):>6}  p50 {s['p50_ms']:8.1f} ms  p95 {s['p95_ms']:8.1f} ms"
        f"  p99 {s['p99_ms']:8.1f} ms  max {s['max_ms']:8.1f} ms\n"
        f"  server CPU per answer: {result['server_cpu_us_per_answer']:.0f} us;"
        f" clients' CPU: {result['clients_cpu_us_per_answer']:.0f} us"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--clients-of", type=int, help=argparse.SUPPRESS)  # a client process
    parser.add_argument("--ca-file", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.clients_of is not None:
        raise_fd_limit()  # the clients run on uvloop, as bench.simworkers does
        ca_pem = Path(args.ca_file).read_text() if args.ca_file else None
        uvloop.run(serve_clients(args.clients_of, args.workers, ca_pem))
        return

    async def figures(args: argparse.Namespace) -> dict[str, Any]:
        return {"workers": args.workers, "tls": args.tls, **await run(args)}

    bench_main(args, figures, render)


if __name__ == "__main__":
    main()
