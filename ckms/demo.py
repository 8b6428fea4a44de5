"""The end-to-end demo behind ``make demo``: everything real, on this machine, in about a minute.

It starts a local Apache Kafka, initialises and unseals a controller (a separate process), enrolls
three agents that run as separate processes with their own root directories standing in for
hosts, creates a key targeted at all of them, rotates it with ``--wait``, prints the fleet table,
revokes the old version with keyCompromise and prints each host's time to removal (watched on
the hosts' disks), issues a ``tls-cert`` key to the three hosts (each makes its own private key;
the controller's CA signs their CSRs), checks the certificates with ``openssl verify``, watches
them renew on a shortened lifetime, revokes the key and writes a CRL, verifies the audit log,
and tears everything down. Every step goes through
the same commands an operator would type (``ckms ...``, ``ckms-agent ...``). The exit status is
0 only if every step converged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ckms.crypto import SubjectRole
from ckms.devkafka import DevCA, LocalKafka
from ckms.errors import CKMSError
from ckms.ssh import generate_ssh_key
from ckms.ssh._keys import write_private_key

KEY = "demo/web-tls"
HOSTS = ("web-1", "web-2", "web-3")
KEY_PATH = "/etc/ckms/keys/{team}/{purpose}.json"
HOOK = "web-tls"
"""The hook name the demo key's install spec gives; each host's own config says what it runs."""
CERT_KEY = "demo/web-cert"
CERT_PATH = "/etc/ckms/keys/tls/{purpose}"
CERT_HOOK = "web-cert"
CERT_LIFETIME_S = 30
"""Shortened so the demo sees a renewal (at two thirds: 20 s); the default is 24 h."""
PASSPHRASE = "demo passphrase: never use this one for real"  # noqa: S105 - throwaway demo

console = Console(highlight=False)


class DemoError(CKMSError):
    """Raised when a demo step did not do what it should; the message says which."""


def _bin(name: str) -> str:
    """The console script next to this interpreter (the project's venv), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Demo:
    """State of one demo run: directories, processes, and the operator's environment."""

    def __init__(self, workdir: Path) -> None:
        self.work = workdir
        self.env: dict[str, str] = {
            k: v for k, v in os.environ.items() if not k.startswith("CKMS_")
        }
        self.processes: list[tuple[str, asyncio.subprocess.Process]] = []
        self.fingerprint = ""
        self.port = 0
        self.kafka: LocalKafka | None = None

    def kafka_ca(self) -> DevCA:
        """The demo Kafka's test CA (it issues the controller's and each host's certificate)."""
        if self.kafka is None:
            raise DemoError("Kafka is not started")
        return self.kafka.ca

    def step(self, text: str) -> None:
        """Say what happens next."""
        console.print(f"\n[bold cyan]▶ {text}[/]")

    async def ckms(
        self, *args: str, check: bool = True, show: bool = False, echo: bool = True
    ) -> Any:
        """Run one ``ckms`` command as an operator would; return parsed --json output if any
        (``echo=False``: a poll, not shown)."""
        return await self._run(_bin("ckms"), args, check=check, show=show, echo=echo)

    async def exit_code(self, *args: str) -> int:
        """Run one ``ckms`` command quietly and return its exit status only."""
        proc = await asyncio.create_subprocess_exec(
            _bin("ckms"),
            *args,
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL,
        )
        return await proc.wait()

    async def _run(
        self,
        exe: str,
        args: Sequence[str],
        *,
        check: bool,
        show: bool,
        env: dict[str, str] | None = None,
        echo: bool = True,
    ) -> Any:
        shown = " ".join(a if " " not in a else repr(a) for a in args)
        if echo:
            console.print(f"  [dim]$ {Path(exe).name} {shown}[/]")
        proc = await asyncio.create_subprocess_exec(
            exe,
            *args,
            env={**self.env, **(env or {})},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        out, err = await proc.communicate()
        text = out.decode()
        if show and text.strip():
            console.print(text.rstrip(), markup=False, highlight=False)
        if check and proc.returncode != 0:
            raise DemoError(
                f"`{Path(exe).name} {shown}` exited {proc.returncode}: "
                f"{err.decode().strip() or text.strip()}"
            )
        if "--json" in args and text.strip():
            return json.loads(text)
        return proc.returncode

    async def start(self, name: str, exe: str, *args: str) -> asyncio.subprocess.Process:
        """Start a long-running process whose output goes to a log file in the work dir."""
        log = (self.work / f"{name}.log").open("ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                exe, *args, env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()
        self.processes.append((name, proc))
        return proc

    async def stop_all(self) -> None:
        """SIGTERM every process (agents first, then the controller), SIGKILL after 20 s."""
        for _name, proc in reversed(self.processes):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for _name, proc in reversed(self.processes):
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    def keyring_path(self, host: str) -> Path:
        """Where the key's keyring lands on one host (under the host's root directory)."""
        key_path = KEY_PATH.format(team="demo", purpose="web-tls").lstrip("/")
        return self.work / "hosts" / host / "root" / key_path

    def reloads(self, host: str) -> int:
        """How often the host's own reload hook ran."""
        log = self.work / "hosts" / host / "reloads.log"
        return len(log.read_text().splitlines()) if log.exists() else 0

    def cert_dir(self, host: str) -> Path:
        """Where the tls-cert key's files land on one host."""
        return self.work / "hosts" / host / "root" / CERT_PATH.format(purpose="web-cert")[1:]

    def keyring(self, host: str) -> dict[str, Any] | None:
        """The key's keyring file on one host, or None when it is not there."""
        try:
            return json.loads(self.keyring_path(host).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # being replaced right now; the next look sees the whole file


async def _wait_fleet(demo: Demo, timeout_s: float) -> dict[str, Any]:
    """Poll the fleet view until every targeted host converged on the key."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = await demo.ckms("fleet", "status", KEY, "--json", check=False)
        if isinstance(reply, dict):
            fleet = reply["keys"][0]
            if fleet["targeted"] == len(HOSTS) and fleet["converged"] == len(HOSTS):
                return fleet
        if time.monotonic() > deadline:
            raise DemoError(f"the fleet did not converge on {KEY} within {timeout_s:.0f} s")
        await asyncio.sleep(0.3)


async def run_demo(keep: bool = False) -> int:
    """Run the whole demo; return the process exit status."""
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="ckms-demo-"))
    demo = Demo(workdir)
    console.print(
        "[bold]ckms demo[/]: a controller, Kafka and three hosts on this machine. "
        f"Logs and files: {workdir}"
    )
    try:
        async with _kafka(demo) as kafka:
            demo.kafka = kafka
            await _controller(demo, kafka.bootstrap)
            await _agents(demo)
            await _key_lifecycle(demo)
            await _certificates(demo)
            demo.step("Verifying the audit log (hash chain and signed checkpoints)")
            await demo.ckms("audit", "verify", show=True)
        console.print(
            f"\n[bold green]✔ demo finished: every step converged "
            f"({time.monotonic() - started:.1f} s)[/]"
        )
        return 0
    except CKMSError as exc:
        console.print(f"\n[bold red]✘ demo failed:[/] {exc}")
        console.print(f"  logs are in {workdir}")
        keep = True
        return 1
    finally:
        await demo.stop_all()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


@contextlib.asynccontextmanager
async def _kafka(demo: Demo) -> AsyncIterator[LocalKafka]:
    demo.step("Starting a local Apache Kafka (KRaft, one node): mutual TLS, ACLs, a test CA")
    async with LocalKafka() as kafka:
        console.print(f"  Kafka ready at {kafka.bootstrap} in {kafka.startup_seconds:.1f} s")
        console.print(
            "  every client needs a certificate: the controller writes events, agents only "
            "read them (their acks go over SSH)"
        )
        try:
            yield kafka
        finally:
            await demo.stop_all()
            console.print("\n[bold cyan]▶ Tearing down: agents, controller, Kafka[/]")


async def _controller(demo: Demo, bootstrap: str) -> None:
    demo.step("Initialising the controller: root KEK wrapped under a passphrase, first admin")
    work = demo.work
    admin_key = work / "admin_ed25519"
    write_private_key(admin_key, generate_ssh_key())
    passfile = work / "passphrase"
    passfile.write_text(PASSPHRASE)
    passfile.chmod(0o600)
    demo.port = _free_port()
    home = work / "controller"
    init = await demo.ckms(
        "init",
        "--home", str(home),
        "--passphrase-file", str(passfile),
        "--admin", "demo-admin",
        "--admin-key", f"{admin_key}.pub",
        "--kafka", bootstrap,
        "--listen", f"127.0.0.1:{demo.port}",
        "--json",
    )  # fmt: skip
    demo.fingerprint = init["host_key_fingerprint"]
    console.print(f"  controller host key {demo.fingerprint}")
    # Where the controller looks for its Kafka certificate by default (<home>/kafka/).
    demo.kafka_ca().install(SubjectRole.CONTROLLER, "controller", home / "kafka")
    console.print("  Kafka client certificate CN=controller,OU=ckms-controller in its home")
    demo.env.update(
        CKMS_CONTROLLER=f"127.0.0.1:{demo.port}",
        CKMS_CONTROLLER_FINGERPRINT=demo.fingerprint,
        CKMS_USER="demo-admin",
        CKMS_IDENTITY=str(admin_key),
    )
    demo.step("Starting the controller (a separate process); it starts sealed")
    await demo.start("controller", _bin("ckms"), "controller", "run", "--config", init["config"])
    deadline = time.monotonic() + 30
    while (code := await demo.exit_code("status")) not in (0, 4):  # 4: up, and sealed
        if time.monotonic() > deadline:
            raise DemoError(f"the controller did not answer within 30 s (last exit {code})")
        await asyncio.sleep(0.3)
    demo.step("Unsealing it with the passphrase")
    await demo.ckms("unseal", "--passphrase-file", str(passfile))


async def _agents(demo: Demo) -> None:
    demo.step(f"Enrolling {len(HOSTS)} hosts; each runs ckms-agent as its own process")
    for host in HOSTS:
        reply = await demo.ckms(
            "host", "enroll", host, "--label", "env=demo", "--label", "role=web", "--json"
        )
        base = demo.work / "hosts" / host
        config = base / "agent.toml"
        await demo._run(
            _bin("ckms-agent"),
            [
                "enroll",
                "--controller", f"127.0.0.1:{demo.port}",
                "--host-key-fingerprint", demo.fingerprint,
                "--state-dir", str(base / "state"),
                "--config", str(config),
                "--root", str(base / "root"),
            ],
            check=True,
            show=False,
            env={"CKMS_AGENT_ENROLL_TOKEN": reply["token"]},  # never on a command line
        )  # fmt: skip
        # The host's admin says what the hook name the key uses runs here (the controller
        # only names it): a reload that notes each run, and a health check that the key is
        # a keyring with a primary.
        reload_cmd = ["sh", "-c", f"echo reloaded >> {base / 'reloads.log'}"]
        health_cmd = ["grep", "-q", '"primary"', str(demo.keyring_path(host))]
        # The certificate's hook: note the reload; check the chain as a server would.
        cert_dir = demo.cert_dir(host)
        cert_reload = ["sh", "-c", f"echo reloaded >> {base / 'cert-reloads.log'}"]
        cert_health = [
            _bin("openssl"), "verify", "-CAfile", str(cert_dir / "ca.pem"),
            "-untrusted", str(cert_dir / "chain.pem"), str(cert_dir / "cert.pem"),
        ]  # fmt: skip
        with config.open("a") as out:
            out.write(
                f"\n[hooks.{HOOK}]\nreload = {json.dumps(reload_cmd)}\n"
                f"health = {json.dumps(health_cmd)}\ntimeout_s = 10\n"
                f"\n[hooks.{CERT_HOOK}]\nreload = {json.dumps(cert_reload)}\n"
                f"health = {json.dumps(cert_health)}\ntimeout_s = 10\n"
            )
        # Enrollment gave the host a Kafka client certificate from the controller's CA; the
        # demo's broker trusts its own test CA, so the host's admin points the agent at a
        # certificate from that one (top-level settings go before the file's tables).
        files = demo.kafka_ca().install(SubjectRole.AGENT, host, base / "state" / "kafka-demo")
        settings = "".join(
            f"{name} = {json.dumps(str(path))}\n"
            for name, path in (
                ("kafka_ca_file", files.ca_file),
                ("kafka_cert_file", files.cert_file),
                ("kafka_key_file", files.key_file),
            )
        )
        config.write_text(settings + config.read_text())
        await demo.start(host, _bin("ckms-agent"), "run", "--config", str(config))
    console.print(f"  enrolled and running: {', '.join(HOSTS)} (each defines hook {HOOK!r})")


async def _key_lifecycle(demo: Demo) -> None:
    demo.step(f"Creating {KEY} (AES-256) for every host labelled env=demo,role=web")
    await demo.ckms(
        "key", "create", KEY,
        "--type", "aes-256",
        "--target", "env=demo,role=web",
        "--path", KEY_PATH,
        "--format", "keyring-json",
        "--reload", HOOK,
    )  # fmt: skip
    fleet = await _wait_fleet(demo, 60)
    console.print(f"  all {fleet['targeted']} hosts installed version 1 and acknowledged it")

    demo.step(f"Rotating {KEY} and waiting for the fleet (--wait)")
    began = time.monotonic()
    await demo.ckms("key", "rotate", KEY, "--wait", "--timeout", "60")
    console.print(f"  all hosts acknowledged v2; the command took {time.monotonic() - began:.2f} s")

    demo.step("The fleet view: which host holds which version")
    await demo.ckms("fleet", "status", KEY, show=True)
    for host in HOSTS:
        ring = demo.keyring(host)
        if ring is None or ring["primary"] != 2 or len(ring["versions"]) != 2:
            raise DemoError(f"{host} does not hold versions 1 and 2 with 2 primary")
    console.print("  each host's keyring holds v1 (kept for its grace) and v2 (primary)")
    if min(demo.reloads(host) for host in HOSTS) < 2:
        raise DemoError(f"a host did not run its {HOOK!r} reload hook for both versions")
    console.print(f"  each host ran the command its own config maps {HOOK!r} to, for each version")

    demo.step("Revoking version 1 with keyCompromise; timing its removal on every host's disk")
    v1 = {host: _material_of(demo.keyring(host), 1) for host in HOSTS}
    removed_at: dict[str, float] = {}

    async def watch_disks() -> None:
        # Started before the revoke command, so a removal is seen the moment it happens.
        deadline = time.monotonic() + 60
        while len(removed_at) < len(HOSTS):
            for host in HOSTS:
                if host not in removed_at:
                    ring = demo.keyring(host)
                    if ring is not None and _material_of(ring, 1) is None:
                        removed_at[host] = time.time()
            if time.monotonic() > deadline:
                missing = sorted(set(HOSTS) - set(removed_at))
                raise DemoError(f"version 1 was still on {', '.join(missing)} after 60 s")
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch_disks())
    try:
        await demo.ckms(
            "key", "revoke", KEY, "--version", "1", "--reason", "keyCompromise",
            "-m", "demo: pretend v1 leaked",
        )  # fmt: skip
        await watcher
    finally:
        watcher.cancel()
    # Measured from the moment the controller committed the revocation (its recorded time),
    # so the CLI's own start-up is not counted.
    shown = await demo.ckms("key", "show", KEY, "--json")
    version1 = next(v for v in shown["versions"] if v["version"] == 1)
    committed = datetime.fromisoformat(version1["compromised_at"]).timestamp()
    removed = {host: max(0.0, at - committed) for host, at in removed_at.items()}
    table = Table(title="revocation committed → v1 gone from the host's disk")
    table.add_column("host")
    table.add_column("removed after", justify="right")
    for host in HOSTS:
        table.add_row(host, f"{removed[host] * 1000:.0f} ms")
        ring = demo.keyring(host)
        text = json.dumps(ring)
        if v1[host] is None or v1[host] in text:
            raise DemoError(f"{host} still holds the revoked material")
    console.print(table)
    await _wait_fleet(demo, 60)
    console.print("  every host acknowledged the removal; the fleet has converged on v2")


def _serial_on_disk(demo: Demo, host: str) -> str | None:
    """The serial of the certificate installed on ``host`` (None: none, or being replaced)."""
    from ckms.crypto import certificate_info

    try:
        return certificate_info((demo.cert_dir(host) / "cert.pem").read_bytes()).serial_hex
    except (OSError, CKMSError):
        return None


async def _cert_fleet(demo: Demo, timeout_s: float, *, not_serials: set[str]) -> dict[str, str]:
    """Poll until every host acknowledged a certificate of the tls-cert key whose serial is not
    in ``not_serials``; return host → serial."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = await demo.ckms("fleet", "status", CERT_KEY, "--json", check=False, echo=False)
        if isinstance(reply, dict) and reply.get("keys"):
            got = {
                h["host"]: h["cert_serial"]
                for h in reply["keys"][0]["hosts"]
                if h.get("cert_installed") and h.get("cert_serial") not in not_serials
            }
            if len(got) == len(HOSTS):
                return got
        if time.monotonic() > deadline:
            raise DemoError(f"not every host installed a certificate within {timeout_s:.0f} s")
        await asyncio.sleep(0.5)


async def _certificates(demo: Demo) -> None:
    demo.step(
        f"Issuing {CERT_KEY} (tls-cert) to the three hosts: each makes its own private key "
        "and sends only a CSR; the controller's CA signs the names the spec renders per host"
    )
    await demo.ckms(
        "key", "create", CERT_KEY,
        "--type", "tls-cert",
        "--target", "env=demo,role=web",
        "--path", CERT_PATH,
        "--san", "{host}.demo.internal",
        "--san", "127.0.0.1",
        "--cert-usage", "both",
        "--cert-lifetime", f"{CERT_LIFETIME_S}s",
        "--reload", CERT_HOOK,
    )  # fmt: skip
    first = await _cert_fleet(demo, 60, not_serials=set())
    await demo.ckms("fleet", "status", CERT_KEY, show=True)

    demo.step("Checking what the hosts installed with OpenSSL (openssl verify -CAfile ca.pem)")
    for host in HOSTS:
        d = demo.cert_dir(host)
        proc = await asyncio.create_subprocess_exec(
            _bin("openssl"), "verify", "-CAfile", str(d / "ca.pem"),
            "-untrusted", str(d / "chain.pem"), str(d / "cert.pem"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise DemoError(f"openssl verify refused {host}'s certificate: {out.decode()}")
        console.print(f"  {host}: {out.decode().strip().replace(str(d) + '/', '')}")

    demo.step(
        f"Watching the hosts renew: {CERT_LIFETIME_S} s certificates are renewed at two thirds "
        "of their lifetime, each with a fresh key"
    )
    began = time.monotonic()
    renewed = await _cert_fleet(demo, 2 * CERT_LIFETIME_S, not_serials=set(first.values()))
    table = Table(title=f"renewed after {time.monotonic() - began:.0f} s of watching")
    for column in ("host", "first serial", "renewed serial"):
        table.add_column(column)
    for host in HOSTS:
        table.add_row(host, first[host][:16] + "…", renewed[host][:16] + "…")
    console.print(table)

    demo.step(f"Revoking {CERT_KEY}: renewal stops, the files go, the serials are published")
    await demo.ckms(
        "key", "revoke", CERT_KEY, "--reason", "keyCompromise", "-m", "demo: retire the certs"
    )
    deadline = time.monotonic() + 60
    while any((demo.cert_dir(h) / "key.pem").exists() for h in HOSTS):
        if time.monotonic() > deadline:
            raise DemoError("a host still holds the revoked certificate's files after 60 s")
        await asyncio.sleep(0.05)
    console.print("  every host removed key.pem, cert.pem and the rest")
    crl = demo.work / "ckms.crl.pem"
    await demo.ckms("ca", "crl", "--out", str(crl), show=True)
    text = crl.read_text()
    if "BEGIN X509 CRL" not in text:
        raise DemoError("ckms ca crl wrote no CRL")


def _material_of(ring: dict[str, Any] | None, version: int) -> str | None:
    if ring is None:
        return None
    for entry in ring.get("versions", []):
        if entry.get("version") == version:
            value = entry.get("material")
            return value if isinstance(value, str) and base64.b64decode(value) else None
    return None


def main(keep: bool = False) -> int:
    """Run the demo (blocking) and return its exit status."""
    return asyncio.run(run_demo(keep=keep))
