"""CPU cost of one SSH RPC request on an open connection, server side and client side.

    python bench/rpc.py                            # 2000 sequential, then 2000 with 50 in flight
    python bench/rpc.py --requests 5000 --concurrency 1,10,50 --rounds 3
    python bench/rpc.py --one-process              # server and client on one event loop
    python bench/rpc.py --transport exec,channel   # an exec channel per request vs frames

A real ``RpcServer`` runs in a child process with one trivial route (``echo``: returns its
parameters), and a real ``RpcClient`` in this process opens one connection to it and, after a
warm-up, makes ``--requests`` calls for each ``--concurrency`` setting (1 = one call after the
other; N = N calls in flight at all times), for each ``--transport``: ``exec`` (an exec channel
per request, as the CLI and OpenSSH make them) or ``channel`` (frames on one ``ckms-rpc``
channel, as agents send them; a fresh connection for each transport). Logging is set up as the
controller and agent set it up in production (INFO, asyncssh at WARNING), so nothing is written
per request.

Prints one line per setting and round: requests/s (wall clock), latency per call (p50, p99), and
CPU milliseconds per request of the server process (``/proc/<pid>/stat``, 10 ms ticks, so use >=
2000 requests) and of this client process (``time.process_time``). With ``--one-process`` the
server runs on the client's event loop and one figure, server + client, is printed: it does not
depend on how the two processes happen to be scheduled, so it is the steadier one for comparing
two versions on a busy machine. ``--json PATH`` also writes the figures as JSON. For a profile,
run py-spy on the server pid it prints (``py-spy record --pid PID --format raw``), or
``--profile client`` (or ``server``) to write a cProfile of that side to ``rpc-client.prof``
(``rpc-server.prof``, warm-up included) in the current directory.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncssh

from bench._proc import cpu_seconds
from ckms.ssh import (
    Principal,
    RpcClient,
    RpcServer,
    fingerprint,
    generate_ssh_key,
)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


async def _echo(principal: Principal, params: dict[str, Any]) -> dict[str, Any]:
    return params


def _server(host_key: asyncssh.SSHKey, client_public: bytes, max_concurrent: int) -> RpcServer:
    """The benchmark's RpcServer: one ``echo`` route, the client's key as the only agent."""
    allowed = fingerprint(asyncssh.import_public_key(client_public))

    async def authenticate(username: str, key: asyncssh.SSHKey) -> Principal | None:
        fp = fingerprint(key)
        return Principal(username, "agent", fp) if fp == allowed else None

    rpc = RpcServer(host_key=host_key, authenticate=authenticate, max_concurrent=max_concurrent)
    rpc.route("echo", _echo, roles={"agent"})
    return rpc


def _serve(
    conn: Any, host_key_pem: bytes, client_public: bytes, max_concurrent: int, profile: bool
) -> None:
    """Child process: serve ``echo`` until the parent sends anything on the pipe."""
    _setup_logging()
    host_key = asyncssh.import_private_key(host_key_pem)

    async def serve() -> None:
        async with _server(host_key, client_public, max_concurrent) as rpc:
            conn.send(rpc.port)
            await asyncio.to_thread(conn.recv)

    if profile:
        cProfile.runctx("asyncio.run(serve())", globals(), locals(), "rpc-server.prof")
    else:
        asyncio.run(serve())


async def _run(
    client: RpcClient, requests: int, concurrency: int, server_pid: int | None
) -> dict[str, Any]:
    params = {"key": "payments/db", "version": 3}
    remaining = requests
    latencies: list[float] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await client.call("echo", params)
            latencies.append(time.perf_counter() - started)

    server_cpu = cpu_seconds(server_pid) if server_pid else 0.0
    client_cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall
    client_cpu = time.process_time() - client_cpu
    result: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": requests,
        "requests_per_s": requests / wall,
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p99_ms": 1000 * statistics.quantiles(latencies, n=100)[98],
    }
    if server_pid:
        server_cpu = cpu_seconds(server_pid) - server_cpu
        result["server_cpu_ms"] = 1000 * server_cpu / requests
        result["client_cpu_ms"] = 1000 * client_cpu / requests
    else:
        result["both_cpu_ms"] = 1000 * client_cpu / requests
    return result


async def _measure(
    args: argparse.Namespace,
    port: int,
    host_key: asyncssh.SSHKey,
    client_key: asyncssh.SSHKey,
    server_pid: int | None,
) -> list[dict[str, Any]]:
    concurrency = [int(c) for c in args.concurrency.split(",")]
    results = []
    for transport in args.transport.split(","):
        results += await _measure_one(
            args, transport, concurrency, port, host_key, client_key, server_pid
        )
    return results


async def _measure_one(
    args: argparse.Namespace,
    transport: str,
    concurrency: list[int],
    port: int,
    host_key: asyncssh.SSHKey,
    client_key: asyncssh.SSHKey,
    server_pid: int | None,
) -> list[dict[str, Any]]:
    if transport not in ("exec", "channel"):
        raise SystemExit(f"--transport: {transport!r} is neither exec nor channel")
    results = []
    async with RpcClient(
        host="127.0.0.1",
        port=port,
        username="bench",
        client_key=client_key,
        host_key_fingerprint=fingerprint(host_key),
        channel=transport == "channel",
    ) as client:
        if client.multiplexed != (transport == "channel"):
            raise SystemExit("the server did not offer the channel")
        await _run(client, 200, max(concurrency), server_pid)  # warm-up
        profile = cProfile.Profile() if args.profile == "client" else None
        for rnd in range(args.rounds):
            for c in concurrency:
                if profile:
                    profile.enable()
                r = await _run(client, args.requests, c, server_pid)
                if profile:
                    profile.disable()
                r["round"] = rnd + 1
                r["transport"] = transport
                results.append(r)
                if server_pid:
                    cpu = f"server {r['server_cpu_ms']:.3f} ms, client {r['client_cpu_ms']:.3f} ms"
                else:
                    cpu = f"server + client {r['both_cpu_ms']:.3f} ms"
                print(
                    f"{transport:7s} round {rnd + 1} concurrency {c:3d}: "
                    f"{r['requests_per_s']:7.0f} req/s, latency p50 "
                    f"{r['latency_p50_ms']:.2f} ms p99 {r['latency_p99_ms']:.2f} ms, "
                    f"CPU per request: {cpu}",
                    flush=True,
                )
        if profile:
            profile.dump_stats("rpc-client.prof")
            print("client profile written to rpc-client.prof")
    return results


async def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    host_key, client_key = generate_ssh_key(), generate_ssh_key()
    client_public = client_key.export_public_key("openssh")
    max_concurrent = max(16, *(int(c) for c in args.concurrency.split(",")))
    if args.one_process:
        async with _server(host_key, client_public, max_concurrent) as rpc:
            assert rpc.port is not None
            return await _measure(args, rpc.port, host_key, client_key, None)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(
        target=_serve,
        args=(
            child,
            host_key.export_private_key("openssh"),
            client_public,
            max_concurrent,
            args.profile == "server",
        ),
        daemon=True,
    )
    server.start()
    assert server.pid is not None
    try:
        port = await asyncio.to_thread(parent.recv)
        print(f"server pid {server.pid}, port {port}", flush=True)
        return await _measure(args, port, host_key, client_key, server.pid)
    finally:
        parent.send("stop")
        server.join(10)
        if server.is_alive():
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=2000, help="calls per setting")
    parser.add_argument("--concurrency", default="1,50", help="calls in flight, comma-separated")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every setting")
    parser.add_argument(
        "--transport", default="exec,channel", help="exec, channel, or both (comma-separated)"
    )
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="run the server in this process too and report their CPU together",
    )
    parser.add_argument(
        "--profile", choices=["client", "server"], help="cProfile one side to rpc-SIDE.prof"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    _setup_logging()
    results = asyncio.run(bench(args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
