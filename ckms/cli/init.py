"""``ckms init``: create a controller home, its root KEK (shares or passphrase), the first admin."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckms.cli._client import run
from ckms.cli._common import JsonOption
from ckms.cli._errors import UsageError, cli_errors
from ckms.cli._parse import parse_controller, parse_shares, read_text_file
from ckms.cli._render import print_json
from ckms.controller.home import init_home


def init(
    home: Annotated[Path, typer.Option(help="The controller's home directory (created).")],
    admin: Annotated[str, typer.Option(help="Name (SSH login) of the first admin.")],
    admin_key: Annotated[Path, typer.Option(help="The first admin's SSH public key file (.pub).")],
    shares: Annotated[
        str | None,
        typer.Option(help="Split the root KEK into N SLIP-39 shares, any M unseal: M/N."),
    ] = None,
    passphrase_file: Annotated[
        Path | None, typer.Option(help="Wrap the root KEK under the passphrase in this file.")
    ] = None,
    kafka: Annotated[str, typer.Option(help="Kafka bootstrap servers.")] = "127.0.0.1:9092",
    listen: Annotated[str, typer.Option(help="SSH listen address HOST:PORT.")] = "127.0.0.1:2222",
    as_json: JsonOption = False,
) -> None:
    """Initialise a controller: settings file, sealed store, first admin, SSH host key.

    The SLIP-39 shares are printed once and never stored: hand one to each custodian.
    """
    with cli_errors():
        if (shares is None) == (passphrase_file is None):
            raise UsageError("give exactly one of --shares M/N or --passphrase-file FILE")
        split = parse_shares(shares) if shares is not None else None
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
            )
        )
    result = done.init
    if as_json:
        print_json(
            {
                "home": str(done.settings.home),
                "config": str(done.config_path),
                "mode": result.mode,
                "threshold": result.threshold,
                "count": result.count,
                "shares": result.mnemonics,
                "admin": done.admin.name,
                "admin_key_fingerprint": done.admin.fingerprint,
                "host_key_fingerprint": done.host_key_fingerprint,
                "signer_key_id": result.signer_key_id,
                "listen": listen,
            }
        )
        return
    typer.echo(f"initialised controller home {done.settings.home} ({done.config_path.name})")
    if result.mode == "shares":
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
