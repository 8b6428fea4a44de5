"""``ckms key``: create, import, list, show, rotate, activate, suspend, resume, revoke, destroy,
policy, targets, history."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from ckms.cli._client import run
from ckms.cli._common import (
    JsonOption,
    MaxFailuresOpt,
    call_and_show,
    conn,
    show_pages,
    wait_converged,
    wait_rollout,
)
from ckms.cli._errors import UsageError, cli_errors
from ckms.cli._parse import (
    parse_approvals,
    parse_duration,
    parse_format,
    parse_key_type,
    parse_mode,
    parse_reason,
    parse_targets,
)
from ckms.cli._render import age, console, err_console, print_json, print_table, table, until, when
from ckms.errors import ConfigError
from ckms.protocol import (
    ActivateWhen,
    InstallSpec,
    Targets,
    canonical_json,
    default_install,
    parse_gate,
    parse_stages,
    validate_key_name,
)
from ckms.protocol import admin as api
from ckms.protocol._rpc import MAX_REQUEST_BYTES
from ckms.protocol.admin import MAX_IMPORT_BYTES, ImportFormat

app = typer.Typer(
    help="Keys: create, rotate, revoke, destroy; policies and targets.", no_args_is_help=True
)

T = TypeVar("T")

NameArg = Annotated[str, typer.Argument(help="Key name, team/purpose.", show_default=False)]
VersionOpt = Annotated[int, typer.Option("--version", "-v", help="Version number.", min=1)]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="Why (recorded in history).")]
TargetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--target",
        "-t",
        help="Label selector env=prod,role=web, or host:<id>. Repeat for more (OR).",
    ),
]
EnvOpt = Annotated[
    str | None, typer.Option("--env", help="The key's environment (hard guard on host env label).")
]
UsageOpt = Annotated[
    str | None,
    typer.Option("--usage", help="Usage mask, comma-separated (default: the type's)."),
]
CryptoperiodOpt = Annotated[str | None, typer.Option(help="Rotate every (e.g. 90d, 1y).")]
GraceOpt = Annotated[
    str | None, typer.Option(help="Keep a superseded version installed for (e.g. 30d).")
]
OwnerOpt = Annotated[str | None, typer.Option(help="File owner on the host.")]
GroupOpt = Annotated[str | None, typer.Option(help="File group on the host.")]
ModeOpt = Annotated[str | None, typer.Option(help="File mode, octal (default 0600).")]
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="Wait until every targeted host acknowledged.")
]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", help="Seconds to --wait before exiting 3.", min=0)
]


def _option(parse: Callable[[str], T], text: str, option: str) -> T:
    """``parse(text)``, its ConfigError a usage error naming ``option``."""
    try:
        return parse(text)
    except ConfigError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _seconds(text: str | None, option: str) -> int | None:
    return None if text is None else int(parse_duration(text, option=option).total_seconds())


def _policy_patch(
    cryptoperiod: str | None,
    grace: str | None,
    activation_delay: str | None,
    max_staleness: str | None,
    approvals: str | None,
    cert_lifetime: str | None = None,
    activate_when: str | None = None,
    activation_deadline: str | None = None,
    activation_threshold: int | None = None,
) -> api.PolicyPatch:
    activation = None
    if activate_when is not None:
        try:
            activation = ActivateWhen(activate_when)
        except ValueError:
            raise UsageError(
                f"--activate-when: unknown value {activate_when!r}; use delay or converged"
            ) from None
    return api.PolicyPatch(
        activate_when=activation,
        activation_deadline_s=_seconds(activation_deadline, "--activation-deadline"),
        activation_threshold_pct=activation_threshold,
        cryptoperiod_s=_seconds(cryptoperiod, "--cryptoperiod"),
        grace_s=_seconds(grace, "--grace"),
        activation_delay_s=_seconds(activation_delay, "--activation-delay"),
        max_staleness_s=_seconds(max_staleness, "--max-staleness"),
        approvals_required=None if approvals is None else parse_approvals(approvals),  # type: ignore[arg-type]
        cert_lifetime_s=_seconds(cert_lifetime, "--cert-lifetime"),
    )


def _install(
    key_type: str | None,
    path: str | None,
    fmt: str | None,
    owner: str | None,
    group: str | None,
    mode: str | None,
    reload: str | None,
    health: str | None,
    current: InstallSpec | None = None,
    tls: dict[str, object] | None = None,
) -> InstallSpec | None:
    """An install spec from options (None when no install option was given)."""
    given = {
        "path": path,
        "format": None if fmt is None else parse_format(fmt),
        "owner": owner,
        "group": group,
        "mode": None if mode is None else parse_mode(mode),
        "reload": reload,
        "health": health,
        "tls": tls or None,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    if current is None:
        current = default_install(parse_key_type(key_type or "aes-256"))
    try:
        return InstallSpec.model_validate({**current.model_dump(exclude_none=True), **given})
    except ValidationError as exc:
        error = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"]) or "install"
        msg = error["msg"].removeprefix("Value error, ")
        raise UsageError(f"install spec {where}: {msg}") from None


def _tls_options(
    san: list[str] | None, cn: str | None, usage: str | None
) -> dict[str, object] | None:
    given: dict[str, object] = {}
    if san:
        given["sans"] = tuple(san)
    if cn is not None:
        given["common_name"] = cn
    if usage is not None:
        given["usage"] = usage
    return given or None


def _render_key(info: api.KeyInfo) -> None:
    out = console()
    out.print(f"[bold]{info.name}[/bold]  type {info.type}  usage {','.join(info.usage)}")
    out.print(
        f"primary v{info.primary_version if info.primary_version else '-'}  "
        f"next rotation {when(info.next_rotation_at)} ({until(info.next_rotation_at)})  "
        f"hosts targeted {info.hosts_targeted if info.hosts_targeted is not None else '-'}"
    )
    p = info.policy
    out.print(
        f"policy: cryptoperiod {age(p.cryptoperiod_s)}, grace {age(p.grace_s)}, activation "
        f"delay {age(p.activation_delay_s)}, max staleness {age(p.max_staleness_s)}, "
        f"approvals {','.join(p.approvals_required) or 'none'}, activate when "
        f"{p.activate_when}"
        + (
            f" (deadline {age(p.activation_deadline_s)})"
            if p.activate_when == "converged" and p.activation_deadline_s
            else ""
        )
    )
    env = f" (env {info.targets.env})" if info.targets.env else ""
    out.print(f"targets: {' | '.join(info.targets.describe()) or 'none'}{env}")
    out.print(f"install: {info.install.path} ({info.install.format}, mode {info.install.mode:04o})")
    out.print(
        table(
            None,
            ["version", "state", "primary", "origin", "created", "activated", "digest"],
            [
                (
                    v.version,
                    v.state,
                    "*" if v.primary else "",
                    v.origin,
                    when(v.created_at),
                    when(v.activated_at),
                    v.digest[:19] + "…",
                )
                for v in info.versions
            ],
        )
    )


def _changed(reply: api.KeyChangeReply, as_json: bool, verb: str) -> None:
    if as_json:
        print_json(reply)
        return
    key = reply.key
    versions = ", ".join(f"v{v}" for v in reply.versions)
    states = ", ".join(
        f"v{v.version} {v.state}" for v in key.versions if v.version in reply.versions
    )
    typer.echo(
        f"{verb} {key.name}{' ' + versions if versions else ''}" + (f": {states}" if states else "")
    )


def _rolling_out(reply: api.KeyChangeReply) -> bool:
    """True when the rotation's new version waits for a rollout (PreActive, no activation
    time)."""
    versions = [v for v in reply.key.versions if v.version in reply.versions]
    return any(str(v.state) == "PreActive" and v.activation_at is None for v in versions)


def _after_change(
    ctx: typer.Context,
    method: str,
    params: BaseModel,
    *,
    as_json: bool,
    verb: str,
    wait: bool = False,
    timeout: float = 60.0,
) -> None:
    """Call ``method``; with ``wait``, then poll the fleet on the same connection."""
    connection = conn(ctx)

    async def go() -> None:
        async with connection.session() as session:
            reply = await session.call(method, params, api.KeyChangeReply)
            _changed(reply, as_json, verb)
            if wait and method == "key.rotate" and _rolling_out(reply):
                # Converged hosts are not the end of a rollout: its activation is.
                (version,) = reply.versions
                info = await wait_rollout(session, reply.key.name, version, timeout)
                err_console().print(
                    f"{reply.key.name}: v{version} rolled out to every stage and is primary"
                    if info.primary_version == version
                    else f"{reply.key.name}: v{version} rolled out"
                )
            elif wait:
                fleet = await wait_converged(session, reply.key.name, timeout)
                err_console().print(
                    f"{reply.key.name}: all {fleet.targeted} targeted hosts converged"
                )

    run(go())


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[
        str | None,
        typer.Argument(help="Key name, team/purpose (or --from-file).", show_default=False),
    ] = None,
    key_type: Annotated[
        str | None,
        typer.Option(
            "--type",
            help="aes-256, hmac-sha256, ed25519, ecdsa-p256, ecdsa-p384, rsa-3072, rsa-4096, "
            "x25519 or secret.",
        ),
    ] = None,
    usage: UsageOpt = None,
    target: TargetOpt = None,
    env: EnvOpt = None,
    cryptoperiod: CryptoperiodOpt = None,
    grace: GraceOpt = None,
    activation_delay: Annotated[
        str | None,
        typer.Option(help="Pre-distribute new versions for (e.g. 1h) before they become primary."),
    ] = None,
    max_staleness: Annotated[
        str | None, typer.Option(help="Flag hosts that have not acknowledged for (e.g. 1d).")
    ] = None,
    approvals: Annotated[
        str | None,
        typer.Option(
            help="Operations under dual control, comma-separated, or none "
            "(default destroy,policy,role)."
        ),
    ] = None,
    path: Annotated[
        str | None,
        typer.Option(help="Install path template ({team}, {purpose}, {name}, {version}, {host})."),
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="raw, base64, pem, openssh, jwk, keyring-json.")
    ] = None,
    owner: OwnerOpt = None,
    group: GroupOpt = None,
    mode: ModeOpt = None,
    reload: Annotated[
        str | None,
        typer.Option(help="Reload hook name; each host's agent config says what it runs."),
    ] = None,
    health: Annotated[
        str | None,
        typer.Option(help="Health-check hook name (default: the reload hook's own check)."),
    ] = None,
    cert_lifetime: Annotated[
        str | None,
        typer.Option(help="tls-cert: how long each host certificate lives (default 24h)."),
    ] = None,
    san: Annotated[
        list[str] | None,
        typer.Option(
            "--san",
            help="tls-cert: a subject alternative name template, e.g. '{host}.db.internal' or "
            "'{label:role}.internal' (repeat; default '{host}'). IPs become IP SANs.",
        ),
    ] = None,
    cn: Annotated[
        str | None, typer.Option("--cn", help="tls-cert: common name template (default {host}).")
    ] = None,
    cert_usage: Annotated[
        str | None,
        typer.Option("--cert-usage", help="tls-cert: server (default), client or both."),
    ] = None,
    length: Annotated[int | None, typer.Option(help="Length of a 'secret' key.", min=1)] = None,
    alphabet: Annotated[str | None, typer.Option(help="Alphabet of a 'secret' key.")] = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            "--from-file",
            help="Create every key of a JSON file at once: a list of objects with the fields of "
            "one key (name, type, usage, policy, targets, install, ...).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Create a key with version 1 (or every key of --from-file, each audited and evented)."""
    if from_file is not None:
        with cli_errors():
            if name is not None or key_type is not None:
                raise UsageError("give either NAME --type TYPE or --from-file, not both")
        _create_from_file(ctx, from_file, as_json=as_json)
        return
    with cli_errors():
        if name is None or key_type is None:
            raise UsageError("NAME and --type are required (or --from-file)")
        kt = parse_key_type(key_type)
        _valid_name(name)
        params = api.KeyCreateParams(
            name=name,
            type=str(kt),
            usage=None
            if usage is None
            else tuple(u.strip() for u in usage.split(",") if u.strip()),
            policy=_policy_patch(
                cryptoperiod, grace, activation_delay, max_staleness, approvals, cert_lifetime
            ),
            targets=parse_targets(target or [], env=env),
            install=_install(
                str(kt),
                path,
                fmt,
                owner,
                group,
                mode,
                reload,
                health,
                tls=_tls_options(san, cn, cert_usage),
            ),
            secret_length=length,
            secret_alphabet=alphabet,
        )
        _after_change(ctx, "key.create", params, as_json=as_json, verb="created")


def _create_from_file(ctx: typer.Context, path: Path, *, as_json: bool) -> None:
    """Send the keys of ``path`` in as few ``key.create_many`` requests as the bound allows."""
    with cli_errors():
        specs = read_key_file(path)
        batches = request_batches(specs)
        connection = conn(ctx)

        async def go() -> list[str]:
            created: list[str] = []
            async with connection.session() as session:
                for batch in batches:
                    reply = await session.call(
                        "key.create_many",
                        api.KeyCreateManyParams(keys=tuple(batch)),
                        api.KeyCreateManyReply,
                    )
                    created += reply.created
                    err_console().print(f"created {len(created)} of {len(specs)} keys")
            return created

        created = run(go())
    if as_json:
        print_json({"created": created})
    else:
        console().print(f"created {len(created)} keys")


def read_key_file(path: Path) -> list[api.KeyCreateParams]:
    """The keys a ``--from-file`` file lists (UsageError naming the entry that is wrong)."""
    if path.suffix.lower() in (".yaml", ".yml"):
        raise UsageError(f"{path}: YAML is not read (no YAML parser is a dependency); use JSON")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is not JSON: {exc}") from None
    if isinstance(data, dict) and set(data) == {"keys"}:
        data = data["keys"]
    if not isinstance(data, list) or not data:
        raise UsageError(f'{path} must hold a non-empty list of keys (or {{"keys": [...]}})')
    out: list[api.KeyCreateParams] = []
    for i, entry in enumerate(data, 1):
        try:
            out.append(api.KeyCreateParams.model_validate(entry))
        except ValidationError as exc:
            first = exc.errors(include_input=False, include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "entry"
            raise UsageError(f"{path}: key {i}: {where}: {first['msg']}") from None
    return out


def request_batches(specs: list[api.KeyCreateParams]) -> list[list[api.KeyCreateParams]]:
    """Split ``specs`` into requests that each fit the request bound (and the per-request max)."""
    budget = MAX_REQUEST_BYTES - 1024  # the envelope ({"keys": [...]}) and some margin
    batches: list[list[api.KeyCreateParams]] = []
    current: list[api.KeyCreateParams] = []
    size = 0
    for spec in specs:
        item = len(canonical_json(spec.model_dump(mode="json", exclude_none=True))) + 1
        if item > budget:
            raise UsageError(f"key {spec.name} is too large for one request")
        if current and (size + item > budget or len(current) >= api.CREATE_MANY_MAX):
            batches.append(current)
            current, size = [], 0
        current.append(spec)
        size += item
    if current:
        batches.append(current)
    return batches


def _valid_name(name: str) -> bool:
    try:
        validate_key_name(name)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return True


@app.command("list")
def list_keys(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List every key with its primary version and next rotation (all pages)."""

    def render(keys: list[api.KeySummary]) -> None:
        print_table(
            ["name", "type", "primary", "versions", "targets", "next rotation"],
            [
                (
                    k.name,
                    k.type,
                    f"v{k.primary_version} {k.primary_state}" if k.primary_version else "none",
                    ", ".join(f"{n} {s}" for s, n in sorted(k.states.items())),
                    " | ".join(k.targets) or "-",
                    until(k.next_rotation_at),
                )
                for k in keys
            ],
        )

    show_pages(ctx, lambda s: api.key_pages(s.call), "keys", render, as_json=as_json)


@app.command("show")
def show(ctx: typer.Context, name: NameArg, as_json: JsonOption = False) -> None:
    """Show a key: policy, targets, install spec and versions."""
    with cli_errors():
        _valid_name(name)
    call_and_show(
        ctx,
        "key.show",
        api.KeyRef(name=name),
        api.KeyChangeReply,
        lambda reply: _render_key(reply.key),
        as_json=as_json,
        json_part=lambda reply: reply.key,
    )


@app.command("history")
def history(ctx: typer.Context, name: NameArg, as_json: JsonOption = False) -> None:
    """Show every state transition of a key's versions (time, actor, reason)."""
    with cli_errors():
        _valid_name(name)

    def render(reply: api.KeyHistoryReply) -> None:
        console().print(
            table(
                None,
                ["at", "version", "from", "to", "operation", "actor", "reason"],
                [
                    (
                        when(h.at),
                        h.version,
                        h.from_state or "-",
                        h.to_state,
                        h.operation,
                        h.actor,
                        h.reason,
                    )
                    for h in reply.history
                ],
            )
        )

    call_and_show(
        ctx, "key.history", api.KeyRef(name=name), api.KeyHistoryReply, render, as_json=as_json
    )


FileFormatOpt = Annotated[
    str,
    typer.Option(
        "--file-format",
        help="Format of the key file: auto, pem, der, openssh, jwk, raw, hex, base64.",
    ),
]


def read_import_file(path: Path) -> str:
    """The base64 text of a key file to import (UsageError if unreadable or too large).

    Only its size and name are ever shown; the controller checks the content. At most one
    byte past the bound is read, whatever the path is: a pipe (``--file <(gpg -d k.gpg)``) or a
    device reports size 0, and a file may grow after it was measured."""
    too_big = f"{path} is larger than a key file (at most {MAX_IMPORT_BYTES} bytes)"
    try:
        size = path.stat().st_size
        if size > MAX_IMPORT_BYTES:
            raise UsageError(f"{path} is {size} bytes; a key file is at most {MAX_IMPORT_BYTES}")
        with path.open("rb") as f:
            data = f.read(MAX_IMPORT_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_IMPORT_BYTES:
        raise UsageError(too_big)
    if not data:
        raise UsageError(f"{path} is empty")
    return base64.b64encode(data).decode("ascii")


def _file_format(text: str) -> ImportFormat:
    try:
        return ImportFormat(text.strip().lower())
    except ValueError:
        names = ", ".join(f.value for f in ImportFormat)
        raise UsageError(f"unknown --file-format {text!r}; use one of {names}") from None


@app.command("import")
def import_key(
    ctx: typer.Context,
    name: NameArg,
    key_type: Annotated[
        str,
        typer.Option(
            "--type",
            help="aes-256, hmac-sha256, ed25519, ecdsa-p256, ecdsa-p384, rsa-3072, rsa-4096, "
            "x25519 or secret.",
        ),
    ],
    file: Annotated[
        Path, typer.Option("--file", help="The key file (PEM, DER, OpenSSH, JWK or raw).")
    ],
    file_format: FileFormatOpt = "auto",
    usage: UsageOpt = None,
    target: TargetOpt = None,
    env: EnvOpt = None,
    cryptoperiod: CryptoperiodOpt = None,
    grace: GraceOpt = None,
    approvals: Annotated[
        str | None,
        typer.Option(help="Operations under dual control, comma-separated, or none."),
    ] = None,
    path: Annotated[str | None, typer.Option(help="Install path template.")] = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="Install format: raw, base64, pem, openssh, jwk, ..."),
    ] = None,
    owner: OwnerOpt = None,
    group: GroupOpt = None,
    mode: ModeOpt = None,
    reload: Annotated[str | None, typer.Option(help="Reload hook name.")] = None,
    health: Annotated[str | None, typer.Option(help="Health-check hook name.")] = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 60.0,
    as_json: JsonOption = False,
) -> None:
    """Import a key you already have (bring your own key) as version 1 of a new key.

    The controller checks type, size, curve and usage, refuses weak or mismatched material,
    stores it sealed like generated material and marks the version origin=imported. The file
    goes to the controller only inside the SSH request body, never on a command line.
    """
    with cli_errors():
        kt = parse_key_type(key_type)
        _valid_name(name)
        params = api.KeyImportParams(
            name=name,
            type=str(kt),
            usage=None
            if usage is None
            else tuple(u.strip() for u in usage.split(",") if u.strip()),
            policy=_policy_patch(cryptoperiod, grace, None, None, approvals),
            targets=parse_targets(target or [], env=env),
            install=_install(str(kt), path, fmt, owner, group, mode, reload, health),
            material=read_import_file(file),  # type: ignore[arg-type]
            format=_file_format(file_format),
        )
        _after_change(
            ctx, "key.import", params, as_json=as_json, verb="imported", wait=wait, timeout=timeout
        )


@app.command("rotate")
def rotate(
    ctx: typer.Context,
    name: NameArg,
    reason: ReasonOpt = None,
    import_file: Annotated[
        Path | None,
        typer.Option(
            "--import-file",
            help="Make the new version from this key file instead of generating it.",
        ),
    ] = None,
    import_format: Annotated[
        str, typer.Option("--import-format", help="Format of --import-file (default auto).")
    ] = "auto",
    activate_when: Annotated[
        str | None,
        typer.Option(
            "--activate-when",
            help="delay (the policy's activation delay) or converged (primary only once every "
            "targeted host acknowledged it). Default: the key's policy.",
        ),
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option(
            "--stages",
            help="Roll out in stages, cumulative shares of the targeted hosts ending at 100% "
            "(e.g. 5%,25%,100%); activates when the last stage converges.",
        ),
    ] = None,
    gate: Annotated[
        str | None,
        typer.Option(
            "--gate",
            help="What each stage must pass before the next: installed, or healthy (the "
            "install spec's health check passed on every host of the stage).",
        ),
    ] = None,
    spread: Annotated[
        str | None,
        typer.Option("--spread", help="Spread each stage's sample over this host label (zone)."),
    ] = None,
    deadline: Annotated[
        str | None,
        typer.Option(
            "--deadline", help="How long the rollout may wait (e.g. 2h; default: the policy's)."
        ),
    ] = None,
    max_failures: MaxFailuresOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 60.0,
    as_json: JsonOption = False,
) -> None:
    """Add a new version (generated, even for an imported key, unless --import-file gives it);
    with --wait, show hosts converging and exit 3 on timeout."""
    with cli_errors():
        _valid_name(name)
        activation = None
        if activate_when is not None:
            try:
                activation = ActivateWhen(activate_when)
            except ValueError:
                raise UsageError(
                    f"--activate-when: unknown value {activate_when!r}; use delay or converged"
                ) from None
        staged = None if stages is None else _option(parse_stages, stages, "--stages")
        gated = None if gate is None else _option(parse_gate, gate, "--gate")
        if activation is ActivateWhen.DELAY and (staged or gated or spread):
            raise UsageError(
                "--activate-when delay cannot go with --stages, --gate or --spread: a staged "
                "rollout activates when its last stage converges"
            )
        params = api.KeyRotateParams(
            name=name,
            reason=reason,
            activate_when=activation,
            stages=staged,
            gate=gated,
            spread=spread,
            deadline_s=_seconds(deadline, "--deadline"),
            max_failures=max_failures,
            material=None if import_file is None else read_import_file(import_file),  # type: ignore[arg-type]
            format=_file_format(import_format),
        )
        _after_change(
            ctx, "key.rotate", params, as_json=as_json, verb="rotated", wait=wait, timeout=timeout
        )


def _version_command(verb: str, past: str, doc: str) -> None:
    def command(
        ctx: typer.Context,
        name: NameArg,
        version: VersionOpt,
        reason: ReasonOpt = None,
        as_json: JsonOption = False,
    ) -> None:
        with cli_errors():
            _valid_name(name)
            params = api.KeyVersionParams(name=name, version=version, reason=reason)
            _after_change(ctx, f"key.{verb}", params, as_json=as_json, verb=past)

    command.__doc__ = doc
    command.__name__ = verb
    app.command(verb)(command)


_version_command("activate", "activated", "PreActive → Active: make a version primary now.")
_version_command("suspend", "suspended", "Active → Suspended (temporarily unusable).")
_version_command("resume", "resumed", "Suspended → Active.")


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    name: NameArg,
    reason: Annotated[
        str,
        typer.Option(
            "--reason",
            help="KMIP reason: unspecified, keyCompromise, cACompromise, affiliationChanged, "
            "superseded, cessationOfOperation or privilegeWithdrawn.",
        ),
    ],
    version: Annotated[
        int | None,
        typer.Option(
            "--version",
            "-v",
            help="One version (default: every version the reason applies to).",
            min=1,
        ),
    ] = None,
    message: Annotated[
        str | None, typer.Option("--message", "-m", help="Free text recorded with the revocation.")
    ] = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 60.0,
    as_json: JsonOption = False,
) -> None:
    """Revoke a key (or one version): compromise reasons → Compromised, others → Deactivated."""
    with cli_errors():
        _valid_name(name)
        params = api.KeyRevokeParams(
            name=name, reason=parse_reason(reason), version=version, message=message
        )
        _after_change(
            ctx, "key.revoke", params, as_json=as_json, verb="revoked", wait=wait, timeout=timeout
        )


@app.command("destroy")
def destroy(
    ctx: typer.Context,
    name: NameArg,
    version: VersionOpt,
    reason: ReasonOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Wipe a version's material (metadata stays); dual control by default."""
    with cli_errors():
        _valid_name(name)
        if not yes and not typer.confirm(
            f"Destroy {name} version {version}? This cannot be undone"
        ):
            raise typer.Exit(1)
        params = api.KeyVersionParams(name=name, version=version, reason=reason)
        _after_change(ctx, "key.destroy", params, as_json=as_json, verb="destroyed")


@app.command("policy")
def policy(
    ctx: typer.Context,
    name: NameArg,
    cryptoperiod: CryptoperiodOpt = None,
    grace: Annotated[
        str | None, typer.Option(help="Keep a superseded version for (e.g. 30d).")
    ] = None,
    activation_delay: Annotated[
        str | None, typer.Option(help="Pre-distribution time (e.g. 1h).")
    ] = None,
    max_staleness: Annotated[
        str | None, typer.Option(help="Host staleness limit (e.g. 1d).")
    ] = None,
    approvals: Annotated[
        str | None, typer.Option(help="Operations under dual control, comma-separated, or none.")
    ] = None,
    cert_lifetime: Annotated[
        str | None,
        typer.Option(help="tls-cert: how long each host certificate lives (default 24h)."),
    ] = None,
    activate_when: Annotated[
        str | None,
        typer.Option(
            "--activate-when",
            help="Rotations' default: delay, or converged (primary once the fleet holds it).",
        ),
    ] = None,
    activation_deadline: Annotated[
        str | None,
        typer.Option(help="How long a converging rotation may wait (e.g. 7d)."),
    ] = None,
    activation_threshold: Annotated[
        int | None,
        typer.Option(
            help="Percent of the counted hosts whose acknowledgement makes a rollout gate "
            "hold (default 100).",
            min=1,
            max=100,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show a key's policy, or change it (dual control by default)."""
    with cli_errors():
        _valid_name(name)
        patch = _policy_patch(
            cryptoperiod,
            grace,
            activation_delay,
            max_staleness,
            approvals,
            cert_lifetime,
            activate_when=activate_when,
            activation_deadline=activation_deadline,
            activation_threshold=activation_threshold,
        )
        if patch.empty:
            reply = conn(ctx).call("key.show", api.KeyRef(name=name), api.KeyChangeReply)
            if as_json:
                print_json(reply.key.policy)
            else:
                _render_key(reply.key)
            return
        params = api.KeyPolicyParams(name=name, policy=patch)
        _after_change(ctx, "key.policy", params, as_json=as_json, verb="changed the policy of")


@app.command("targets")
def targets(
    ctx: typer.Context,
    name: NameArg,
    target: TargetOpt = None,
    env: EnvOpt = None,
    path: Annotated[str | None, typer.Option(help="New install path template.")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="New install format.")] = None,
    owner: Annotated[str | None, typer.Option(help="New file owner.")] = None,
    group: Annotated[str | None, typer.Option(help="New file group.")] = None,
    mode: Annotated[str | None, typer.Option(help="New file mode, octal.")] = None,
    reload: Annotated[str | None, typer.Option(help="New reload hook name.")] = None,
    health: Annotated[str | None, typer.Option(help="New health-check hook name.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show a key's targets, or replace them (and optionally its install spec)."""
    with cli_errors():
        _valid_name(name)
        connection = conn(ctx)
        install_given = any(v is not None for v in (path, fmt, owner, group, mode, reload, health))
        if not target and env is None and not install_given:
            reply = connection.call("key.show", api.KeyRef(name=name), api.KeyChangeReply)
            if as_json:
                print_json(
                    {
                        "targets": reply.key.targets.model_dump(mode="json"),
                        "install": reply.key.install.model_dump(mode="json"),
                    }
                )
            else:
                typer.echo(" | ".join(reply.key.targets.describe()) or "none")
            return
        current = connection.call("key.show", api.KeyRef(name=name), api.KeyChangeReply).key
        new_targets: Targets = (
            parse_targets(target, env=env if env is not None else current.targets.env)
            if target
            else parse_targets(current.targets.describe(), env=env)
        )
        install = _install(
            current.type, path, fmt, owner, group, mode, reload, health, current.install
        )
        params = api.KeyTargetsParams(name=name, targets=new_targets, install=install)
        _after_change(ctx, "key.targets", params, as_json=as_json, verb="retargeted")
