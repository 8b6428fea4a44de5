"""Idle footprint of one real agent process: RSS, CPU per second, broker requests, open fds.

    python bench/footprint.py                  # 60 s idle window
    python bench/footprint.py --duration 10

A real Kafka broker and a real controller (in this process) are started; one host is enrolled
with the real CLI (``ckms-agent enroll``), a key is created for it, and ``ckms-agent run`` is
started as its own process with the agent's default settings. Once the key is installed and
acknowledged (and a few seconds have passed for start-up work to finish), the agent is left idle
for ``--duration`` seconds while this script samples its ``/proc`` entries every second.

Broker requests are counted **on the broker**: this script's broker logs every completed
request (``kafka.request.logger`` at DEBUG), and the lines whose ``clientId`` is the agent's
(``ckms-agent-<host>``, its consumer; acks go over SSH) are counted per API. That logging is
only switched on here, for the count; the fleet benchmark's broker does not log requests.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _proc import cpu_seconds, load_average, open_fds, rss_mb, status_kb
from _tls import agent_tls_env, tls_settings

from ckms.controller.sealing import init_controller
from ckms.controller.service import Controller, ControllerSettings
from ckms.crypto import SubjectRole
from ckms.devkafka import LocalKafka
from ckms.protocol import InstallSpec, Targets

HOST = "idle-1"
LABELS = {"role": "footprint"}
PASSPHRASE = "benchmark passphrase, not a secret"
_API = re.compile(r'"requestApiKeyName":"([A-Z_]+)"|"requestApiKey":(\d+)')
_CLIENT = re.compile(r'"clientId":"([^"]*)"')
_API_NAMES = {
    "0": "PRODUCE", "1": "FETCH", "2": "LIST_OFFSETS", "3": "METADATA", "18": "API_VERSIONS"
}  # fmt: skip


class RequestLoggingKafka(LocalKafka):
    """LocalKafka whose broker logs every completed request (for counting them)."""

    def _write_config(self, node: Any) -> None:
        super()._write_config(node)
        path = node.directory / "log4j2.properties"
        text = path.read_text().replace(
            "logger.request.level = WARN", "logger.request.level = DEBUG"
        )
        path.write_text(text)


def count_requests(log: Path, start: int, end: int, client_prefix: str) -> dict[str, int]:
    """Completed requests by API between two byte offsets of the broker log, for one client."""
    counts: collections.Counter[str] = collections.Counter()
    with log.open("rb") as src:
        src.seek(start)
        chunk = src.read(end - start).decode("utf-8", "replace")
    for line in chunk.splitlines():
        if "Completed request" not in line:
            continue
        client = _CLIENT.search(line)
        if client is None or not client.group(1).startswith(client_prefix):
            continue
        api = _API.search(line)
        name = "?" if api is None else (api.group(1) or _API_NAMES.get(api.group(2), api.group(2)))
        counts[name] += 1
    return dict(counts)


async def main_async(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="ckms-footprint-", dir=args.dir))
    bindir = Path(sys.executable).parent
    logging.basicConfig(level=logging.ERROR)
    print(f"ckms agent footprint; load {load_average()}; data in {work}", file=sys.stderr)
    async with RequestLoggingKafka() as kafka:
        controller = Controller(
            ControllerSettings(
                home=work / "controller",
                listen_port=0,
                kafka_bootstrap=kafka.bootstrap,
                **tls_settings(kafka.security(SubjectRole.CONTROLLER, "footprint")),
                events_topic="ckms.events.footprint",
                fleet_topic="ckms.fleet.footprint",
            )
        )
        async with controller:
            assert controller.store is not None
            await init_controller(controller.store, passphrase=PASSPHRASE)
            await controller.vault.unseal_with_passphrase(PASSPHRASE)
            task = asyncio.create_task(controller.run())
            try:
                await controller.wait_started()
                return await measure(args, work, bindir, kafka, controller)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def measure(
    args: argparse.Namespace, work: Path, bindir: Path, kafka: LocalKafka, c: Controller
) -> int:
    token = await c.hosts.create_token(HOST, LABELS, actor="bench")
    config = work / HOST / "agent.toml"
    enroll = await asyncio.create_subprocess_exec(
        str(bindir / "ckms-agent"), "enroll",
        "--controller", f"127.0.0.1:{c.port}",
        "--token", token.token,
        "--host-key-fingerprint", c.host_key_fingerprint,
        "--state-dir", str(work / HOST / "state"),
        "--config", str(config),
        "--root", str(work / HOST / "root"),
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    if await enroll.wait() != 0:
        print("enrollment failed", file=sys.stderr)
        return 1
    await c.lifecycle.create(
        "idle/key",
        "aes-256",
        targets=Targets(selectors=(LABELS,)),
        install=InstallSpec(path="/etc/ckms/keys/{team}/{purpose}.json", format="keyring-json"),
        actor="bench",
    )
    agent_log = (work / "agent.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKMS_AGENT_")}
    env |= agent_tls_env(kafka)
    agent = await asyncio.create_subprocess_exec(
        str(bindir / "ckms-agent"), "run", "--config", str(config),
        stdout=agent_log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        assert c.store is not None
        deadline = time.monotonic() + 60
        while not await c.store.fetchval(
            "SELECT count(*) FROM fleet_state WHERE host_id = ? AND status = 'installed'", (HOST,)
        ):
            if agent.returncode is not None or time.monotonic() > deadline:
                print(f"the agent did not install its key; see {work / 'agent.log'}")
                return 1
            await asyncio.sleep(0.2)
        await asyncio.sleep(args.settle)
        pid = agent.pid
        log = kafka.log_path(0)
        rss: list[float] = []
        load_start = load_average()
        log0 = log.stat().st_size
        profiler = None
        if args.profile:
            profiler = await asyncio.create_subprocess_exec(
                str(bindir / "py-spy"), "record", "--pid", str(pid), "--format", "raw",
                "--idle", "-o", args.profile,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        cpu0 = cpu_seconds(pid)
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.duration:
            rss.append(rss_mb(pid))
            await asyncio.sleep(1.0)
        elapsed = time.monotonic() - t0
        cpu1 = cpu_seconds(pid)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            await asyncio.wait_for(profiler.wait(), 30)
        log1 = log.stat().st_size
        fds = open_fds(pid)
        threads = status_kb(pid, "Threads")
        rss_anon, rss_file = status_kb(pid, "RssAnon") / 1024, status_kb(pid, "RssFile") / 1024
        requests = count_requests(log, log0, log1, f"ckms-agent-{HOST}")
        total = sum(requests.values())
        report = {
            "duration_s": round(elapsed, 1),
            "rss_mb_mean": round(sum(rss) / len(rss), 1),
            "rss_mb_max": round(max(rss), 1),
            "rss_anon_mb": round(rss_anon, 1),
            "rss_file_mb": round(rss_file, 1),
            "cpu_ms_per_s": round(1000 * (cpu1 - cpu0) / elapsed, 3),
            "broker_requests_per_s": round(total / elapsed, 3),
            "broker_requests": requests,
            "open_fds": fds,
            "threads": threads,
            "load_start": load_start,
            "load_end": load_average(),
        }
    finally:
        if agent.returncode is None:
            agent.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(agent.wait(), 30)
            except TimeoutError:
                agent.kill()
                await agent.wait()
        agent_log.close()
    report["exit_code_on_sigterm"] = agent.returncode
    print(render(report))
    if args.json:
        text = json.dumps(report, indent=2)
        await asyncio.to_thread(Path(args.json).write_text, text)
    return 0


def render(r: dict[str, Any]) -> str:
    """The footprint against the targets (40 MB RSS, 1 ms CPU per second)."""
    fds = r["open_fds"]
    lines = [
        f"idle agent, {r['duration_s']} s (load {r['load_start']} → {r['load_end']})",
        f"  RSS                  {r['rss_mb_mean']:.1f} MB mean, {r['rss_mb_max']:.1f} MB max "
        f"(target ≤ 40 MB: {'met' if r['rss_mb_max'] <= 40 else 'MISSED'}); "
        f"{r['rss_anon_mb']:.1f} MB private, {r['rss_file_mb']:.1f} MB mapped files",
        f"  CPU                  {r['cpu_ms_per_s']:.3f} ms per second "
        f"(target ≤ 1 ms/s: {'met' if r['cpu_ms_per_s'] <= 1 else 'MISSED'})",
        f"  broker requests      {r['broker_requests_per_s']:.3f} per second "
        f"{r['broker_requests']} (counted in the broker's request log)",
        f"  open fds             {fds['total']} (sockets {fds['socket']}, files {fds['file']}, "
        f"pipes {fds['pipe']}, other {fds['other']}); threads {r['threads']}",
        f"  SIGTERM              exit code {r['exit_code_on_sigterm']}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="idle window, seconds")
    parser.add_argument("--settle", type=float, default=5.0, help="wait after install, seconds")
    parser.add_argument("--dir", default=None, help="where the temp dir goes")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--profile", default=None, help="py-spy the idle agent into this file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main_async(parse_args())))
