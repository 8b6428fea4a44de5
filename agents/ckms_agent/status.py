"""``ckms-agent status``: what this host holds, how fresh it is, and what it still has to say.

Read from the state DB (WAL lets this run beside the daemon) and the files on disk; it never
contacts the controller and never reads out key material (files are hashed, not shown).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ckms_agent.config import AgentConfig
from ckms_agent.installer import Installer
from ckms_agent.plan import is_stale, staleness_limit
from ckms_agent.policy import HostPolicy
from ckms_agent.state import AgentState


@dataclass(frozen=True)
class VersionStatus:
    """One held version."""

    version: int
    state: str
    primary: bool
    digest: str


@dataclass(frozen=True)
class KeyStatus:
    """One held key: versions, files, whether they are intact, whether the key is stale."""

    key: str
    key_type: str
    versions: list[VersionStatus]
    paths: list[str]
    intact: bool
    stale: bool
    max_staleness_s: int | None


@dataclass(frozen=True)
class AgentStatus:
    """The whole report, as ``--json`` prints it."""

    host: str
    controller: str
    state_db: str
    initialized: bool
    revoked: bool
    last_contact: str | None
    seconds_since_contact: float | None
    any_stale: bool
    pending_acks: int
    ack_seq: int
    keys: list[KeyStatus]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _exists(path: Path) -> bool:
    return path.exists()


async def collect_status(config: AgentConfig, *, now: float | None = None) -> AgentStatus:
    """Build the status report from the state DB and the files."""
    now = time.time() if now is None else now
    controller = config.controller_address
    base = {
        "host": config.host_id,
        "controller": controller,
        "state_db": str(config.state_db_path),
    }
    if not _exists(config.state_db_path):
        return AgentStatus(
            **base,
            initialized=False,
            revoked=False,
            last_contact=None,
            seconds_since_contact=None,
            any_stale=False,
            pending_acks=0,
            ack_seq=0,
            keys=[],
        )
    installer = Installer(
        host_id=config.host_id, root=config.root, policy=HostPolicy.from_config(config)
    )
    async with AgentState(config.state_db_path) as state:
        last = await state.last_contact()
        records = await state.keys()
        keys = [
            KeyStatus(
                key=r.name,
                key_type=r.key_type,
                versions=[
                    VersionStatus(v.version, v.state, v.primary, v.digest)
                    for v in sorted(r.versions.values(), key=lambda v: v.version)
                ],
                paths=[str(p) for p in r.paths],
                intact=installer.files_match(r.files),
                stale=is_stale(
                    r, last_contact=last, now=now, default=config.default_max_staleness_s
                ),
                max_staleness_s=staleness_limit(r, config.default_max_staleness_s),
            )
            for r in sorted(records.values(), key=lambda r: r.name)
        ]
        return AgentStatus(
            **base,
            initialized=True,
            revoked=await state.revoked(),
            last_contact=_iso(last),
            seconds_since_contact=None if last is None else round(now - last, 3),
            any_stale=any(k.stale for k in keys),
            pending_acks=await state.pending_ack_count(),
            ack_seq=await state.ack_seq(),
            keys=keys,
        )


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def render_text(status: AgentStatus) -> str:
    """A human-readable report."""
    lines = [f"host        {status.host}  (controller {status.controller})"]
    if not status.initialized:
        lines.append(f"state       none yet at {status.state_db} (the agent has not run)")
        return "\n".join(lines)
    if status.revoked:
        lines.append("REVOKED     the controller revoked this host; re-enroll to use it again")
    if status.last_contact is None:
        lines.append("contact     never")
    else:
        lines.append(
            f"contact     {status.last_contact} ({status.seconds_since_contact:.0f} s ago)"
        )
    lines.append(f"stale       {'YES' if status.any_stale else 'no'}")
    lines.append(f"acks        {status.pending_acks} pending (last seq {status.ack_seq})")
    if not status.keys:
        lines.append("keys        none")
        return "\n".join(lines)
    lines.append("")
    header = ("KEY", "VERSION", "PRIMARY", "STATE", "DIGEST", "PATH", "NOTE")
    rows: list[tuple[str, ...]] = [header]
    for key in status.keys:
        note = ", ".join(n for n, on in (("stale", key.stale), ("drifted", not key.intact)) if on)
        for i, v in enumerate(key.versions):
            rows.append(
                (
                    key.key if i == 0 else "",
                    str(v.version),
                    "*" if v.primary else "",
                    v.state,
                    v.digest[:19] + "…",
                    ", ".join(key.paths) if i == 0 else "",
                    note if i == 0 else "",
                )
            )
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines.extend(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
    return "\n".join(lines)
