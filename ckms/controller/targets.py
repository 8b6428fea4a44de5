"""Matching hosts against a key's targets: pure functions, no I/O.

Rules (see :class:`~ckms.controller.models.Targets`): a host matches when any selector's labels
are all present on it with equal values, or when its id is listed explicitly; then the
environment guard applies: if the key has an environment, a host whose ``env`` label differs or
is missing never matches, listed or not (production keys never reach another environment's
hosts). Revoked hosts never match.
"""

from __future__ import annotations

from collections.abc import Iterable

from ckms.controller.models import Host, Targets
from ckms.protocol._keyspec import ENV_LABEL

__all__ = ["ENV_LABEL", "env_blocked", "host_matches", "match_hosts"]


def host_matches(targets: Targets, host: Host) -> bool:
    """Return True if the key with these targets belongs on ``host``."""
    return not host.revoked and targets.matches(host.id, host.labels)


def match_hosts(targets: Targets, hosts: Iterable[Host]) -> list[Host]:
    """Return the hosts (in the order given) that the key with these targets belongs on."""
    return [h for h in hosts if host_matches(targets, h)]


def env_blocked(targets: Targets, hosts: Iterable[Host]) -> list[Host]:
    """Return hosts listed by id that the environment guard keeps the key away from."""
    return [
        h
        for h in hosts
        if h.id in targets.hosts and not h.revoked and not targets.env_allows(h.labels)
    ]
