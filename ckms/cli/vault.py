"""``ckms status``, ``ckms unseal``, ``ckms seal``: the controller's health and sealing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckms.cli._client import Connection
from ckms.cli._common import JsonOption, call_and_show, conn
from ckms.cli._errors import ExitCode, UsageError, cli_errors
from ckms.cli._parse import read_text_file
from ckms.cli._render import console, until, when
from ckms.crypto import age_decrypt_ssh, is_age_file
from ckms.errors import CKMSError
from ckms.protocol import admin as api
from ckms.ssh import load_private_key
from ckms.ssh._keys import KeyPassphraseNeeded


def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Controller health: sealing, Kafka, backlog, due rotations, stale hosts, the audit anchor;
    exit 4 if sealed, 1 if the audit log does not extend its anchor."""

    def render(reply: api.StatusReply) -> None:
        out = console()
        seal = "SEALED" if reply.sealed else "unsealed"
        if reply.sealed and reply.mode == "shares":
            seal += f" ({reply.shares_given} of {reply.threshold} shares given)"
        out.print(f"controller {reply.listen}: {seal}; host key {reply.host_key_fingerprint}")
        lead = reply.leadership
        if lead is not None:
            role = "leader" if lead.leading else "follower"
            epoch = "" if lead.epoch is None else f", lease epoch {lead.epoch}"
            out.print(f"replica {lead.replica}: {role}; leader {lead.leader or 'none'}{epoch}")
            for r in lead.replicas:
                state = "sealed" if r.sealed else "unsealed"
                flags = " (leader)" if r.leader else ""
                flags += "" if r.alive else " (not seen lately)"
                out.print(
                    f"  {r.name} {r.address} v{r.version}: {state}, last seen "
                    f"{when(r.last_seen_at)}{flags}"
                )
        k = reply.kafka
        kafka = "connected" if k.connected else "NOT connected"
        out.print(
            f"kafka {k.bootstrap}: {kafka}; outbox backlog {k.backlog}, published {k.published}"
            + (f", last error: {k.last_error}" if k.last_error and not k.connected else "")
        )
        out.print(
            f"keys {reply.keys}; hosts {reply.hosts} ({len(reply.stale_hosts)} stale"
            + (f": {', '.join(reply.stale_hosts[:10])}" if reply.stale_hosts else "")
            + f"), {reply.hosts_revoked} revoked; pending requests {reply.pending_requests}"
        )
        c = reply.due_counts
        out.print(
            f"rotations due: {c.get('overdue', 0)} overdue, {c.get('1d', 0)} within 1 day, "
            f"{c.get('7d', 0)} within 7 days, {c.get('30d', 0)} within 30 days; "
            f"{reply.activations_due} activations and {reply.deactivations_due} deactivations due"
        )
        for due in reply.rotations_due[:10]:
            out.print(
                f"  {due.key} v{due.version}: {when(due.due_at)} ({until(due.due_at, reply.now)})"
            )
        for w in reply.cert_warnings[:20]:
            state = "EXPIRED" if w.expired else f"expires {when(w.not_after)}"
            out.print(
                f"[bold yellow]certificate not renewed[/bold yellow]: host {w.host} {w.key} "
                f"v{w.version} serial {w.serial} {state} (renewal was due {when(w.renew_at)})"
            )
        for r in reply.rollouts:
            line = f"rollout {r.key} v{r.version}: {r.state}, stage {r.stage} of {len(r.stages)}"
            if r.failed:
                line += f"; failed on {', '.join(r.failed[:10])}"
            if r.waiting:
                line += f"; held up by {', '.join(r.waiting[:10])}"
                line += f" and {len(r.waiting) - 10} more" if len(r.waiting) > 10 else ""
            out.print(line)
        a = reply.audit_anchor
        if a is not None and a.broken:
            out.print(
                "[bold red]AUDIT LOG DOES NOT EXTEND ITS LAST SIGNED ANCHOR[/bold red]: "
                f"{a.broken}; checkpoints are not signed and audited operations are refused"
            )
        elif a is not None:
            anchor = "none yet" if a.size is None else f"{a.size}:{a.head}"
            pending = "" if a.size is None or a.published_size == a.size else " (not published)"
            loaded = "" if a.loaded else " (not read back from Kafka yet: nothing is signed)"
            out.print(f"audit anchor {anchor}{pending}{loaded}")

    reply = call_and_show(ctx, "status", None, api.StatusReply, render, as_json=as_json)
    if reply.sealed:
        raise typer.Exit(int(ExitCode.SEALED))
    if reply.audit_anchor is not None and reply.audit_anchor.broken:
        raise typer.Exit(int(ExitCode.FAILED))


def unseal(
    ctx: typer.Context,
    share_file: Annotated[
        Path | None,
        typer.Option(
            help="Your share: the NAME.age file `ckms init --custodian` made (decrypted here "
            "with --identity), or a file holding the mnemonic itself."
        ),
    ] = None,
    identity: Annotated[
        Path | None,
        typer.Option(
            "--identity",
            help="The SSH private key that decrypts an age share file (default: the key you "
            "log in with, --identity of ckms / CKMS_IDENTITY).",
        ),
    ] = None,
    passphrase_file: Annotated[
        Path | None, typer.Option(help="A file holding the unseal passphrase.")
    ] = None,
) -> None:
    """Give your share (or the passphrase) to the controller, to each replica named if
    several; prompts when no file is given."""
    with cli_errors():
        if share_file is not None and passphrase_file is not None:
            raise UsageError("give --share-file or --passphrase-file, not both")
        connection = conn(ctx)
        if share_file is not None:
            key_path = identity or connection.identity or Path.home() / ".ssh" / "id_ed25519"
            params = api.UnsealParams(share=_read_share(share_file, key_path))
        elif passphrase_file is not None:
            params = api.UnsealParams(
                passphrase=read_text_file(passphrase_file, option="--passphrase-file")
            )
        else:
            state = connection.call("status", None, api.StatusReply)
            if not state.sealed and len(connection.endpoints) == 1:
                typer.echo("controller is already unsealed")
                return
            if state.mode == "passphrase":
                params = api.UnsealParams(passphrase=typer.prompt("Passphrase", hide_input=True))
            else:
                params = api.UnsealParams(
                    share=typer.prompt(
                        f"Your share ({state.shares_given} of {state.threshold} given so far)",
                        hide_input=True,
                    )
                )
        _each_replica(connection, "unseal", params)


def _each_replica(connection: Connection, method: str, params: api.UnsealParams | None) -> None:
    """Send ``method`` to every controller named, one by one: each replica keeps its own seal
    (docs/architecture.md, "Unsealing replicas"), so a share given to one unseals only that
    one. Exit 1 if any replica could not be reached or refused."""
    endpoints = connection.endpoints
    failed = False
    sealed: set[str] = set()
    unsealed: set[str] = set()
    for endpoint in endpoints:
        name = f"controller {endpoint}: " if len(endpoints) > 1 else ""
        try:
            reply = connection.call(method, params, api.SealReply, endpoint=endpoint)
        except CKMSError as exc:
            if len(endpoints) == 1:
                raise
            failed = True
            typer.echo(f"{name}{type(exc).__name__}: {exc}", err=True)
            continue
        if method == "seal":
            typer.echo(f"{name}controller sealed" if not name else f"{name}sealed")
            sealed.add(reply.replica or str(endpoint))
            unsealed.update(reply.unsealed_replicas)
        elif reply.sealed:
            typer.echo(
                f"{name}share accepted: {reply.given} of {reply.threshold} given; still sealed"
            )
        else:
            typer.echo(f"{name}controller unsealed" if not name else f"{name}unsealed")
    left = sorted(unsealed - sealed)
    if left:
        # An emergency seal that missed a replica leaves the KEK in that one's memory.
        failed = True
        typer.echo(
            f"still unsealed (by their last heartbeat): {', '.join(left)}; seal each one "
            "too (--controller with every replica's address; `ckms status` lists them)",
            err=True,
        )
    if failed:
        raise typer.Exit(int(ExitCode.FAILED))


def _read_share(path: Path, identity: Path) -> str:
    """The mnemonic in ``path``: decrypted with ``identity`` if it is an age file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--share-file: cannot read {path}: {exc.strerror}") from None
    if len(data) > 64 * 1024:
        raise UsageError(f"--share-file: {path} is too large")
    if not is_age_file(data):
        return read_text_file(path, option="--share-file")
    try:
        key = load_private_key(identity)  # ConfigError names the problem (missing, mode, ...)
    except KeyPassphraseNeeded:
        secret = typer.prompt(f"Passphrase of {identity}", hide_input=True, err=True)
        key = load_private_key(identity, secret)
    plain = age_decrypt_ssh(data, key.export_private_key("openssh"))
    try:
        return plain.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UsageError(f"--share-file: {path} does not hold a share") from None


def seal(ctx: typer.Context) -> None:
    """Seal the controller (every replica named): it forgets its keys until unsealed again."""
    with cli_errors():
        _each_replica(conn(ctx), "seal", None)
