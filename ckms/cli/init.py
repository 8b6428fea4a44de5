"""``ckms init``: create a controller home, its root KEK (shares or passphrase), the first admin.

With ``--shares M/N`` each share goes to a custodian: ``--custodian NAME=KEY.pub`` once per
share makes NAME an operator with role custodian and encrypts their share with age to that
ssh-ed25519 key (written to ``--share-dir`` as ``NAME.age``), so no terminal ever shows every
share. Printing the shares in clear needs ``--print-shares``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ckms.cli._client import run
from ckms.cli._common import JsonOption
from ckms.cli._errors import UsageError, cli_errors
from ckms.cli._parse import parse_controller, parse_shares, read_text_file
from ckms.cli._render import print_json
from ckms.controller.home import HomeInit, init_home


def init(
    home: Annotated[Path, typer.Option(help="The controller's home directory (created).")],
    admin: Annotated[str, typer.Option(help="Name (SSH login) of the first admin.")],
    admin_key: Annotated[Path, typer.Option(help="The first admin's SSH public key file (.pub).")],
    shares: Annotated[
        str | None,
        typer.Option(help="Split the root KEK into N SLIP-39 shares, any M unseal: M/N."),
    ] = None,
    custodian: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=KEY.pub, once per share: NAME becomes a custodian and gets their share "
            "age-encrypted to that ssh-ed25519 key."
        ),
    ] = None,
    share_dir: Annotated[
        Path | None,
        typer.Option(help="Write each custodian's encrypted share here as NAME.age."),
    ] = None,
    print_shares: Annotated[
        bool,
        typer.Option(
            "--print-shares",
            help="Print every share in clear instead (one terminal sees them all: avoid).",
        ),
    ] = False,
    passphrase_file: Annotated[
        Path | None, typer.Option(help="Wrap the root KEK under the passphrase in this file.")
    ] = None,
    kafka: Annotated[str, typer.Option(help="Kafka bootstrap servers.")] = "127.0.0.1:9092",
    listen: Annotated[str, typer.Option(help="SSH listen address HOST:PORT.")] = "127.0.0.1:2222",
    store: Annotated[
        str | None,
        typer.Option(
            help="Keep the store in a PostgreSQL database, postgresql://user@host:port/db "
            "(default: HOME/controller.db); its password from --store-password-file or PGPASSWORD."
        ),
    ] = None,
    store_password_file: Annotated[
        Path | None,
        typer.Option(help="A file (mode 0600) holding the PostgreSQL store's password."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Initialise a controller: settings file, sealed store, first admin, SSH host key.

    Shares are never stored: each custodian's is age-encrypted to their SSH key (--custodian),
    or, with --print-shares, printed once in clear.
    """
    with cli_errors():
        if (shares is None) == (passphrase_file is None):
            raise UsageError("give exactly one of --shares M/N or --passphrase-file FILE")
        split = parse_shares(shares) if shares is not None else None
        custodians = [_parse_custodian(c) for c in custodian or []]
        if shares is not None and not custodians and not print_shares:
            raise UsageError(
                "--shares: give --custodian NAME=KEY.pub for each share (encrypted to them), "
                "or --print-shares to show them all in clear"
            )
        if custodians and print_shares:
            raise UsageError("--print-shares and --custodian exclude each other")
        if shares is None and (custodians or print_shares):
            raise UsageError("--custodian and --print-shares go with --shares M/N")
        if share_dir is not None and not custodians:
            raise UsageError("--share-dir holds custodians' encrypted shares: give --custodian")
        if share_dir is not None and share_dir.exists() and any(share_dir.iterdir()):
            raise UsageError(f"--share-dir: {share_dir} is not empty")
        if share_dir is not None:
            _prepare(share_dir)
        passphrase = (
            read_text_file(passphrase_file, option="--passphrase-file")
            if passphrase_file is not None
            else None
        )
        listen_host, listen_port = parse_controller(listen, option="--listen", allow_any_port=True)
        public = read_text_file(admin_key, option="--admin-key")
        done = run(
            init_home(
                home,
                admin=admin,
                admin_public_key=public,
                shares=split,
                passphrase=passphrase,
                kafka_bootstrap=kafka,
                listen_host=listen_host,
                listen_port=listen_port,
                custodians=custodians,
                store=store,
                store_password_file=(
                    None if store_password_file is None else store_password_file.resolve()
                ),
            )
        )
        written = _write_shares(done, share_dir) if share_dir is not None else {}
    _report(done, written, listen, print_shares=print_shares, as_json=as_json)


def _parse_custodian(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise UsageError(f"--custodian: expected NAME=KEY.pub, got {text!r}")
    return name, read_text_file(Path(path), option=f"--custodian {name}")


def _prepare(share_dir: Path) -> None:
    """Create the share directory before anything else, so a bad one stops init early."""
    try:
        share_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UsageError(f"--share-dir: cannot create {share_dir}: {exc.strerror}") from None
    if not os.access(share_dir, os.W_OK):
        raise UsageError(f"--share-dir: {share_dir} is not writable")


def _write_shares(done: HomeInit, share_dir: Path) -> dict[str, str]:
    """Write NAME.age per custodian (ciphertext, but still 0600: it is theirs alone)."""
    try:
        written = {}
        for name, armored in done.encrypted_shares.items():
            path = share_dir / f"{name}.age"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(armored)
            written[name] = str(path)
    except OSError as exc:
        raise UsageError(
            f"--share-dir: cannot write {share_dir}: {exc.strerror}; the shares are lost, so "
            f"remove {done.settings.home} and run init again"
        ) from None
    return written


def _report(
    done: HomeInit, written: dict[str, str], listen: str, *, print_shares: bool, as_json: bool
) -> None:
    result = done.init
    if as_json:
        out = {
            "home": str(done.settings.home),
            "config": str(done.config_path),
            "mode": result.mode,
            "threshold": result.threshold,
            "count": result.count,
            "custodians": [
                {
                    "name": c.name,
                    "fingerprint": c.fingerprint,
                    "share": done.encrypted_shares[c.name],
                    **({"file": written[c.name]} if c.name in written else {}),
                }
                for c in done.custodians
            ],
            "admin": done.admin.name,
            "admin_key_fingerprint": done.admin.fingerprint,
            "host_key_fingerprint": done.host_key_fingerprint,
            "signer_key_id": result.signer_key_id,
            "listen": listen,
        }
        if print_shares:
            out["shares"] = result.mnemonics
        print_json(out)
        return
    typer.echo(f"initialised controller home {done.settings.home} ({done.config_path.name})")
    if result.mode == "shares" and done.custodians:
        typer.echo(
            f"root key split into {result.count} shares; any {result.threshold} unseal. Each "
            "is age-encrypted to its custodian's SSH key (decrypt: age -d -i KEY FILE, or "
            "ckms unseal --share-file FILE):"
        )
        for c in done.custodians:
            where = written.get(c.name)
            typer.echo(f"  {c.name} ({c.fingerprint}): {where or 'below'}")
            if where is None:
                typer.echo(done.encrypted_shares[c.name])
    elif result.mode == "shares":
        typer.echo(
            f"root key split into {result.count} shares; any {result.threshold} unseal. They are "
            "shown ONCE and stored nowhere: give one to each custodian now."
        )
        for number, mnemonic in enumerate(result.mnemonics, start=1):
            typer.echo(f"  share {number}: {mnemonic}")
    else:
        typer.echo("root key wrapped under the passphrase; keep the passphrase safe")
    typer.echo(f"first admin: {done.admin.name} (key {done.admin.fingerprint})")
    typer.echo(f"controller host key: {done.host_key_fingerprint}  (agents and operators pin it)")
    typer.echo(f"start it with: ckms controller run --config {done.config_path}")
    typer.echo(
        f"then: export CKMS_CONTROLLER={listen} "
        f"CKMS_CONTROLLER_FINGERPRINT={done.host_key_fingerprint} CKMS_USER={done.admin.name}; "
        "ckms unseal"
    )
