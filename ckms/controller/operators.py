"""Operators: the people who drive the controller, each with one SSH key and one role.

Roles: ``admin`` (crypto officer: everything, including operators), ``operator`` (key lifecycle
and hosts, except what needs dual control), ``custodian`` (unseal/seal, status, approve
requests), ``auditor`` (read only). A removed operator is disabled, not deleted, so the audit
log's actor names keep pointing at a row; adding the same name again re-enables it with the new
key and role. The last enabled admin cannot be removed (nobody could manage operators any more).
Every change writes its audit record in the same transaction.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from datetime import datetime

import asyncssh
from pydantic import BaseModel, ConfigDict

from ckms.controller import rowmac
from ckms.errors import AlreadyExistsError, ConfigError, NotFoundError, PolicyError
from ckms.protocol import APPROVER_ROLES, OPERATOR_ROLES, Role
from ckms.protocol.canonical import canonical_json
from ckms.store import Clock, Store, format_time, parse_time, utc_now
from ckms.store import audit as audit_log

META_CUSTODIAN_SET = "custodians.set"
META_CUSTODIANS_CONFIRMED = "custodians.confirmed_at"

__all__ = [
    "APPROVER_ROLES",
    "Operator",
    "OperatorRegistry",
    "parse_ssh_public_key",
    "validate_operator_name",
]

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,63}$")
_RESERVED = frozenset({"enroll", "anonymous", "init", "root"})


class Operator(BaseModel):
    """One operator row."""

    model_config = ConfigDict(frozen=True)

    name: str
    role: str
    ssh_public_key: str
    fingerprint: str
    created_at: datetime
    created_by: str
    disabled: bool


def parse_ssh_public_key(text: str) -> tuple[str, str]:
    """Return (``type base64`` line, ``SHA256:`` fingerprint) of an OpenSSH public key line."""
    try:
        key = asyncssh.import_public_key(text.strip())
    except (asyncssh.KeyImportError, ValueError, TypeError):
        raise ConfigError(
            "not an OpenSSH public key (expected one line like 'ssh-ed25519 AAAA... comment')"
        ) from None
    line = key.export_public_key("openssh").decode().strip()
    return " ".join(line.split()[:2]), str(key.get_fingerprint("sha256"))


def validate_operator_name(name: str) -> str:
    """Return ``name`` if it can name an operator, else raise ConfigError."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in _RESERVED:
        raise ConfigError(
            f"operator name {str(name)[:64]!r} must be 1-64 lowercase letters, digits, '.', '_' "
            "or '-', start with a letter or '_', and not be one of "
            f"{', '.join(sorted(_RESERVED))}"
        )
    return name


def _operator(row: object) -> Operator:
    line = str(row["ssh_public_key"])  # type: ignore[index]
    try:
        _, fp = parse_ssh_public_key(line)
    except ConfigError:
        fp = "?"
    return Operator(
        name=row["name"],  # type: ignore[index]
        role=row["role"],  # type: ignore[index]
        ssh_public_key=line,
        fingerprint=fp,
        created_at=parse_time(row["created_at"]),  # type: ignore[index]
        created_by=row["created_by"],  # type: ignore[index]
        disabled=bool(row["disabled"]),  # type: ignore[index]
    )


class OperatorRegistry:
    """The ``operators`` table: add, remove (disable), list, look up."""

    def __init__(self, store: Store, *, clock: Clock = utc_now) -> None:
        self.on_removed: Callable[[str, str], object] | None = None
        """Called with (operator, actor) once a removal committed (the controller closes the
        operator's open SSH connections)."""
        self._store = store
        self._clock = clock

    async def get(self, name: str, *, enabled_only: bool = False) -> Operator:
        """Return one operator, or raise NotFoundError."""
        row = await self._store.fetchone("SELECT * FROM operators WHERE name = ?", (name,))
        if row is None or (enabled_only and row["disabled"]):
            raise NotFoundError(f"no operator named {name!r}")
        rowmac.check_operator(self._store.row_key, row)
        return _operator(row)

    async def list(self) -> list[Operator]:
        """Return every operator, disabled ones included, by name."""
        rows = await self._store.fetchall("SELECT * FROM operators ORDER BY name")
        for row in rows:
            rowmac.check_operator(self._store.row_key, row)
        return [_operator(r) for r in rows]

    async def other_approvers(self, name: str) -> int:
        """How many enabled operators other than ``name`` could approve a request."""
        roles = sorted(APPROVER_ROLES)
        marks = ", ".join("?" * len(roles))
        value = await self._store.fetchval(
            "SELECT count(*) FROM operators WHERE disabled = 0 AND name != ? "  # noqa: S608
            f"AND role IN ({marks})",
            (name, *roles),
        )
        return int(value or 0)

    # -- the custodian set and the end of bootstrap ------------------------------------------

    async def record_custodian_set(self, custodians: Sequence[Operator], *, actor: str) -> None:
        """Remember who got a share at init (name and key), until they confirm it."""
        members = [{"name": c.name, "fingerprint": c.fingerprint} for c in custodians]
        async with self._store.write() as tx:
            await tx.set_meta(META_CUSTODIAN_SET, canonical_json(members))
            await audit_log.append(
                tx,
                now=self._clock(),
                actor=actor,
                action="custodians.set",
                object="custodians",
                details={"custodians": members},
            )

    async def bootstrap_open(self) -> bool:
        """True until a custodian set is confirmed; while open (and only then), operator
        changes that nobody else could approve run without approval."""
        return await self._store.get_meta(META_CUSTODIANS_CONFIRMED) is None

    async def confirm_custodians(self, contributors: Sequence[tuple[str, str]]) -> bool:
        """Close bootstrap for good if every share of an unseal came from a custodian's key.

        ``contributors`` are the (name, key fingerprint) pairs whose shares unsealed the
        controller. The set counts as confirmed when each is an enabled custodian with that
        key: M custodians have proved they hold their key and their share. Returns whether
        this call confirmed it (False if already confirmed or not a custodian set).
        """
        if not contributors or not await self.bootstrap_open():
            return False
        custodians = {
            (op.name, op.fingerprint)
            for op in await self.list()
            if op.role == Role.CUSTODIAN and not op.disabled
        }
        if not all(tuple(c) in custodians for c in contributors):
            return False
        members = [{"name": n, "fingerprint": fp} for n, fp in sorted(contributors)]
        now = self._clock()
        async with self._store.write() as tx:
            if await tx.get_meta(META_CUSTODIANS_CONFIRMED) is not None:
                return False
            await tx.set_meta(META_CUSTODIANS_CONFIRMED, format_time(now).encode())
            await audit_log.append(
                tx,
                now=now,
                actor=",".join(n for n, _ in sorted(contributors)),
                action="custodians.confirm",
                object="custodians",
                details={"custodians": members, "bootstrap": "closed"},
            )
        log.info("custodian set confirmed by %d custodians; bootstrap closed", len(members))
        return True

    async def add(
        self,
        name: str,
        role: str,
        ssh_public_key: str,
        *,
        actor: str,
        details: dict[str, object] | None = None,
    ) -> Operator:
        """Add an operator (or re-enable a removed one with a new key and role)."""
        validate_operator_name(name)
        if role not in OPERATOR_ROLES:
            raise ConfigError(f"unknown role {role!r}; use one of {', '.join(OPERATOR_ROLES)}")
        role = str(Role(role))
        line, fp = parse_ssh_public_key(ssh_public_key)
        now = self._clock()
        async with self._store.write() as tx:
            existing = await tx.fetchone("SELECT * FROM operators WHERE name = ?", (name,))
            if existing is not None:
                rowmac.check_operator(tx.row_key, existing)
            if existing is not None and not existing["disabled"]:
                raise AlreadyExistsError(f"operator {name} already exists")
            owner = await tx.fetchval(
                "SELECT name FROM operators WHERE ssh_public_key = ? AND name != ?", (line, name)
            )
            if owner is not None:
                raise AlreadyExistsError(f"this SSH key already belongs to operator {owner}")
            host = await tx.fetchval("SELECT id FROM hosts WHERE id = ?", (name,))
            if host is not None:
                raise AlreadyExistsError(f"{name} is the id of an enrolled host; pick another name")
            values = (line, role, format_time(now), actor, name)
            if existing is None:
                await tx.execute(
                    "INSERT INTO operators(ssh_public_key, role, created_at, created_by, name) "
                    "VALUES (?, ?, ?, ?, ?)",
                    values,
                )
            else:
                await tx.execute(
                    "UPDATE operators SET ssh_public_key = ?, role = ?, created_at = ?, "
                    "created_by = ?, disabled = 0 WHERE name = ?",
                    values,
                )
            await rowmac.stamp_operator(tx, name)
            await audit_log.append(
                tx,
                now=now,
                actor=actor,
                action="operator.add",
                object=f"operator:{name}",
                details={"role": role, "fingerprint": fp, **(details or {})},
            )
            row = await tx.fetchone("SELECT * FROM operators WHERE name = ?", (name,))
        log.info("operator %s (%s) added by %s", name, role, actor)
        return _operator(row)

    async def remove(
        self, name: str, *, actor: str, details: dict[str, object] | None = None
    ) -> Operator:
        """Disable an operator: their key no longer logs in. The last admin stays."""
        now = self._clock()
        async with self._store.write() as tx:
            row = await tx.fetchone(
                "SELECT * FROM operators WHERE name = ? AND disabled = 0", (name,)
            )
            if row is None:
                raise NotFoundError(f"no operator named {name!r}")
            rowmac.check_operator(tx.row_key, row)
            if row["role"] == Role.ADMIN:
                admins = await tx.fetchval(
                    "SELECT count(*) FROM operators WHERE role = ? AND disabled = 0",
                    (str(Role.ADMIN),),
                )
                if int(admins) <= 1:
                    raise PolicyError(f"{name} is the last admin; add another admin first")
            await tx.execute("UPDATE operators SET disabled = 1 WHERE name = ?", (name,))
            await rowmac.stamp_operator(tx, name)
            await audit_log.append(
                tx,
                now=now,
                actor=actor,
                action="operator.remove",
                object=f"operator:{name}",
                details={"role": row["role"], **(details or {})},
            )
            row = await tx.fetchone("SELECT * FROM operators WHERE name = ?", (name,))
        log.info("operator %s removed by %s", name, actor)
        if self.on_removed is not None:
            self.on_removed(name, actor)
        return _operator(row)
