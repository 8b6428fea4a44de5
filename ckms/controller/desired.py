"""What a host should hold, and whether what it reports holding differs: pure, no I/O.

The one definition behind agent sync, the fleet view, ``fleet status`` and heartbeat drift: a
host should hold a version of a key when the key targets the (non-revoked) host
(:func:`~ckms.controller.targets.host_matches`) and the version is distributable
(:func:`~ckms.controller.transitions.is_distributable`: PreActive or Active, material present)
and, for a version that waits for its rollout (:func:`~ckms.controller.transitions.awaits_rollout`),
the rollout released it to the host. A waiting version without its rollout (the row deleted
outside the controller) goes to no host: fail closed. Two copies of this rule would let the
fleet view, the fetch authorization and the agent disagree about the same host.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from ckms.controller.keyview import AnyKey, AnyVersion, KeyView
from ckms.controller.models import Host, Key, Targets
from ckms.controller.targets import host_matches
from ckms.controller.transitions import awaits_rollout, is_distributable

__all__ = [
    "Held",
    "desired_versions",
    "distributable_versions",
    "drifted_keys",
    "drifts",
    "held_by_key",
    "released_to",
    "targeting",
    "wanted",
]

K = TypeVar("K", Key, KeyView)

Held = frozenset[tuple[int, str]]
"""What a host holds of one key: (version, digest) pairs."""


def targeting(keys: Iterable[K], host: Host) -> Iterator[K]:
    """The keys whose targets select ``host``, in the order given.

    Keys loaded from the store share one targets object per distinct targets text, so the
    match is decided once per distinct object, not once per key (100,000 keys of a fleet have a
    few hundred distinct targets): a sync stays cheap however many keys there are.
    """
    decided: dict[int, tuple[Targets, bool]] = {}
    for key in keys:
        seen = decided.get(id(key.targets))
        if seen is None or seen[0] is not key.targets:
            seen = (key.targets, host_matches(key.targets, host))
            decided[id(key.targets)] = seen
        if seen[1]:
            yield key


def distributable_versions(key: AnyKey) -> tuple[AnyVersion, ...]:
    """The versions of ``key`` that hosts it targets may hold (a rollout releases a waiting one
    host by host: :func:`desired_versions`)."""
    return tuple(v for v in key.versions if is_distributable(v.state, has_material=v.has_material))


def released_to(key: AnyKey, version: AnyVersion, host: Host) -> bool:
    """True unless ``version`` waits for a rollout that has not released it to ``host``."""
    if not awaits_rollout(version.state, version.activation_at):
        return True
    rollout = key.rollout
    if rollout is None or rollout.version != version.version or not rollout.live:
        return False
    return rollout.releases(host.id)


def desired_versions(key: AnyKey, host: Host) -> tuple[AnyVersion, ...]:
    """The versions of ``key`` that belong on ``host`` (empty when the key does not target it)."""
    if not host_matches(key.targets, host):
        return ()
    return tuple(v for v in distributable_versions(key) if released_to(key, v, host))


def wanted(key: AnyKey, host: Host) -> Held:
    """The (version, digest) pairs ``host`` should hold of ``key``."""
    return frozenset((v.version, v.digest) for v in desired_versions(key, host))


def held_by_key(installed: Iterable[tuple[str, int, str]]) -> dict[str, Held]:
    """Group (key, version, digest) reports of a host by key."""
    out: dict[str, set[tuple[int, str]]] = {}
    for key, version, digest in installed:
        out.setdefault(key, set()).add((version, digest))
    return {k: frozenset(v) for k, v in out.items()}


def drifts(key: AnyKey, host: Host, installed: Iterable[tuple[str, int, str]]) -> bool:
    """True when what ``host`` reports holding of ``key`` differs from what it should hold."""
    return key.name in drifted_keys([key], host, installed)


def drifted_keys(
    keys: Iterable[AnyKey], host: Host, installed: Iterable[tuple[str, int, str]]
) -> list[str]:
    """Names of the keys where what ``host`` reports holding differs from what it should hold.

    A key the host holds that no longer targets it (or no longer exists) drifts too.
    """
    held = held_by_key(installed)
    want = {k.name: wanted(k, host) for k in targeting(keys, host)}
    names = {n for n, w in want.items() if w} | set(held)
    return sorted(n for n in names if want.get(n, frozenset()) != held.get(n, frozenset()))
