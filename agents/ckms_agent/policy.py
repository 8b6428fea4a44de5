"""The host decides what the controller may do to it: install roots, owners, hooks.

The controller's install spec *names* things (a path, an owner, a hook); this host's own
root-owned config says which of them it accepts. A spec that names a path outside the allowed
roots, an owner or group not allowed, a hook the host does not define, or (unless the host opts
in) a command of its own is refused before anything is fetched or written, and acked ``failed``
with the reason, which the operator sees in ``ckms fleet status``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ckms.errors import ConfigError
from ckms.protocol import HookSpec, InstallSpec
from ckms_agent.config import DEFAULT_ALLOWED_PATHS, AgentConfig, HookCommand
from ckms_agent.files import InstallError, resolve_ids
from ckms_agent.hooks import Hook


class PolicyRefusal(InstallError):
    """Raised when this host's policy refuses an install spec (the message says why)."""


@dataclass(frozen=True)
class HostPolicy:
    """What this host allows (from its own config; never from the controller)."""

    allowed_paths: tuple[Path, ...] = DEFAULT_ALLOWED_PATHS
    allowed_owners: tuple[str, ...] = ()
    allowed_groups: tuple[str, ...] = ()
    hooks: Mapping[str, HookCommand] = field(default_factory=dict)
    allow_controller_commands: bool = False

    @classmethod
    def from_config(cls, config: AgentConfig) -> HostPolicy:
        """The policy part of the agent's config."""
        return cls(
            allowed_paths=config.allowed_paths,
            allowed_owners=config.allowed_owners,
            allowed_groups=config.allowed_groups,
            hooks=dict(config.hooks),
            allow_controller_commands=config.allow_controller_commands,
        )

    def allowed_root(self, path: str) -> tuple[Path, tuple[str, ...]]:
        """The allowed root ``path`` lies under and the components below it (else refused)."""
        if any(part in (".", "..") for part in path.split("/")):
            raise PolicyRefusal(f"install path {path} has a '.' or '..' segment")
        target = Path(path)
        for root in sorted(self.allowed_paths, key=lambda p: len(p.parts), reverse=True):
            try:
                rest = target.relative_to(root)
            except ValueError:
                continue
            if rest.parts:
                return root, rest.parts
        allowed = ", ".join(str(p) for p in self.allowed_paths) or "none"
        raise PolicyRefusal(f"install path {path} is outside this host's allowed paths ({allowed})")

    def check_spec(self, spec: InstallSpec) -> list[Hook]:
        """Refuse what this host does not allow in ``spec``; return the hooks it runs, in order."""
        self._check_ids(spec)
        return self.hooks_for(spec)

    def _check_ids(self, spec: InstallSpec) -> None:
        uid, gid = resolve_ids(spec.owner, spec.group)
        if uid not in (-1, 0) and uid not in _ids(self.allowed_owners, user=True):
            raise PolicyRefusal(
                f"owner {spec.owner} is not allowed on this host (allowed_owners: "
                f"{', '.join(self.allowed_owners) or 'root only'})"
            )
        if gid not in (-1, 0) and gid not in _ids(self.allowed_groups, user=False):
            raise PolicyRefusal(
                f"group {spec.group} is not allowed on this host (allowed_groups: "
                f"{', '.join(self.allowed_groups) or 'root only'})"
            )

    def hooks_for(self, spec: InstallSpec) -> list[Hook]:
        """The reload and health hooks ``spec`` names, as this host defines them."""
        out: list[Hook] = []
        health_from_reload: Hook | None = None
        if spec.reload is not None:
            if isinstance(spec.reload, HookSpec):
                out.append(self._controller_command("reload", spec.reload))
            else:
                entry = self._entry(spec.reload)
                if entry.reload is not None:
                    out.append(_hook("reload", spec.reload, entry.reload, entry))
                if entry.health is not None:
                    health_from_reload = _hook("health", spec.reload, entry.health, entry)
        if spec.health is not None:
            if isinstance(spec.health, HookSpec):
                out.append(self._controller_command("health", spec.health))
            else:
                entry = self._entry(spec.health)
                if entry.health is None:
                    raise PolicyRefusal(f"hook {spec.health!r} defines no health check here")
                out.append(_hook("health", spec.health, entry.health, entry))
        elif health_from_reload is not None:
            out.append(health_from_reload)
        return out

    def _entry(self, name: str) -> HookCommand:
        entry = self.hooks.get(name)
        if entry is None:
            raise PolicyRefusal(
                f"hook {name!r} is not defined on this host (its agent config has no "
                f"[hooks.{name}])"
            )
        return entry

    def _controller_command(self, kind: str, spec: HookSpec) -> Hook:
        if not self.allow_controller_commands:
            raise PolicyRefusal(
                f"the install spec gives a {kind} command; this host runs only the hooks its "
                "own config defines (allow_controller_commands is off)"
            )
        return Hook(kind, None, spec.argv, spec.timeout_s)  # type: ignore[arg-type]


def _hook(kind: str, name: str, argv: tuple[str, ...], entry: HookCommand) -> Hook:
    return Hook(
        kind,  # type: ignore[arg-type]
        name,
        argv,
        entry.timeout_s,
        entry.user,
        log_output=entry.log_output,
    )


def _ids(names: Iterable[str], *, user: bool) -> set[int]:
    out = set()
    for name in names:
        try:
            uid, gid = resolve_ids(name, None) if user else resolve_ids(None, name)
        except ConfigError:  # a name this host does not know allows nothing
            continue
        out.add(uid if user else gid)
    return out
