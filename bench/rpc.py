"""CPU cost of one SSH RPC request on an open connection, server side and client side.

    python bench/rpc.py                            # 2000 sequential, then 2000 with 50 in flight
    python bench/rpc.py --requests 5000 --concurrency 1,10,50 --rounds 3

A real ``RpcServer`` runs in a child process with one trivial route (``echo``: returns its
parameters), and a real ``RpcClient`` in this process opens one connection to it and, after a
warm-up, makes ``--requests`` calls for each ``--concurrency`` setting (1 = one call after the
other; N = N calls in flight at all times). Logging is set up as the controller and agent set it
up in production (INFO, asyncssh at WARNING), so nothing is written per request.

Prints one line per setting and round: requests/s (wall clock), and CPU milliseconds per request
of the server process (``/proc/<pid>/stat``, 10 ms ticks, so use >= 2000 requests) and of this
client process (``time.process_time``). ``--json PATH`` also writes the figures as JSON. For a
profile, run py-spy on the server pid it prints (``py-spy record --pid PID --format raw``), or
``--profile client`` (or ``server``) to write a cProfile of that side to ``rpc-client.prof``
(``rpc-server.prof``), warm-up included.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._proc import cpu_seconds  # noqa: E402
from ckms.ssh import (  # noqa: E402
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


def _serve(
    conn: Any, host_key_pem: bytes, client_public: bytes, max_concurrent: int, profile: bool
) -> None:
    """Child process: serve ``echo`` until the parent sends anything on the pipe."""
    import asyncssh

    _setup_logging()
    host_key = asyncssh.import_private_key(host_key_pem)
    allowed = fingerprint(asyncssh.import_public_key(client_public))

    async def authenticate(username: str, key: asyncssh.SSHKey) -> Principal | None:
        fp = fingerprint(key)
        return Principal(username, "agent", fp) if fp == allowed else None

    async def main() -> None:
        rpc = RpcServer(host_key=host_key, authenticate=authenticate, max_concurrent=max_concurrent)
        rpc.route("echo", _echo, roles={"agent"})
        async with rpc:
            conn.send(rpc.port)
            await asyncio.to_thread(conn.recv)

    if profile:
        cProfile.runctx("asyncio.run(main())", globals(), locals(), "rpc-server.prof")
    else:
        asyncio.run(main())


async def _run(
    client: RpcClient, requests: int, concurrency: int, server_pid: int
) -> dict[str, float]:
    params = {"key": "payments/db", "version": 3}
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await client.call("echo", params)

    server_cpu, client_cpu, wall = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall
    client_cpu = time.process_time() - client_cpu
    server_cpu = cpu_seconds(server_pid) - server_cpu
    return {
        "concurrency": concurrency,
        "requests": requests,
        "requests_per_s": requests / wall,
        "server_cpu_ms": 1000 * server_cpu / requests,
        "client_cpu_ms": 1000 * client_cpu / requests,
    }


async def bench(args: argparse.Namespace) -> list[dict[str, float]]:
    host_key, client_key = generate_ssh_key(), generate_ssh_key()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(
        target=_serve,
        args=(
            child,
            host_key.export_private_key("openssh"),
            client_key.export_public_key("openssh"),
            max(16, *concurrency),
            args.profile == "server",
        ),
        daemon=True,
    )
    server.start()
    assert server.pid is not None
    try:
        port = await asyncio.to_thread(parent.recv)
        print(f"server pid {server.pid}, port {port}", flush=True)
        results = []
        async with RpcClient(
            host="127.0.0.1",
            port=port,
            username="bench",
            client_key=client_key,
            host_key_fingerprint=fingerprint(host_key),
        ) as client:
            await _run(client, 200, max(concurrency), server.pid)  # warm-up
            profile = cProfile.Profile() if args.profile == "client" else None
            for rnd in range(args.rounds):
                for c in concurrency:
                    if profile:
                        profile.enable()
                    r = await _run(client, args.requests, c, server.pid)
                    if profile:
                        profile.disable()
                    r["round"] = rnd + 1
                    results.append(r)
                    print(
                        f"round {rnd + 1} concurrency {c:3d}: {r['requests_per_s']:7.0f} req/s, "
                        f"CPU per request: server {r['server_cpu_ms']:.3f} ms, "
                        f"client {r['client_cpu_ms']:.3f} ms",
                        flush=True,
                    )
            if profile:
                profile.dump_stats("rpc-client.prof")
                print("client profile written to rpc-client.prof")
        return results
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
