"""The key view's entries: a key and its versions as slim, read-only objects.

The controller keeps every key in memory for the agent requests (sync and fetch read all of
them on each request). As pydantic models a key with one version is about 20 objects and 3.5 KB
(100,000 keys: over 600 MB of RSS). :class:`KeyView` and :class:`VersionView` have the same
attributes and helpers as :class:`~ckms.controller.models.Key` and
:class:`~ckms.controller.models.KeyVersion`, in slots, sharing the parsed policy, targets,
install spec and usage of the keys that have the same ones (:func:`ckms.controller._repo`
parses each distinct text once) and the times that are equal; :meth:`KeyView.to_model` makes the
pydantic model where one is needed. They are built only from rows already checked against
their MACs, and nothing changes them: a key change replaces the key's entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TypeAlias

from ckms.controller.models import (
    InstallSpec,
    Key,
    KeyHelpers,
    KeyState,
    KeyVersion,
    Origin,
    Policy,
    RevocationReason,
    Rollout,
    Targets,
    Usage,
)
from ckms.crypto import KeyType

__all__ = ["AnyKey", "AnyVersion", "KeyView", "VersionView"]


@dataclass(frozen=True, slots=True, eq=False)
class VersionView:
    """One version of a cached key (the fields of :class:`~ckms.controller.models.KeyVersion`)."""

    key: str
    version: int
    state: KeyState
    digest: str
    has_material: bool
    created_at: datetime
    created_by: str
    state_changed_at: datetime
    activation_at: datetime | None = None
    activated_at: datetime | None = None
    superseded_at: datetime | None = None
    deactivated_at: datetime | None = None
    compromised_at: datetime | None = None
    destroyed_at: datetime | None = None
    revocation_reason: RevocationReason | None = None
    revocation_message: str | None = None
    origin: Origin = "generated"

    def to_model(self) -> KeyVersion:
        """The pydantic model of this version."""
        return KeyVersion.model_construct(
            **{name: getattr(self, name) for name in VersionView.__slots__}
        )


@dataclass(frozen=True, slots=True, eq=False)
class KeyView(KeyHelpers[VersionView]):
    """A cached key (the fields and helpers of :class:`~ckms.controller.models.Key`)."""

    id: str
    name: str
    type: KeyType
    usage: frozenset[Usage]
    policy: Policy
    targets: Targets
    install: InstallSpec
    secret_length: int | None
    secret_alphabet: str | None
    primary_version: int | None
    created_at: datetime
    created_by: str
    updated_at: datetime
    versions: tuple[VersionView, ...]
    rollout: Rollout | None = None
    """The key's current or last rollout (few keys have one: the model itself)."""

    def to_model(self) -> Key:
        """The pydantic model of this key (for a reply that needs one)."""
        fields = {name: getattr(self, name) for name in KeyView.__slots__}
        fields["versions"] = tuple(v.to_model() for v in self.versions)
        return Key.model_construct(**fields)

    def __eq__(self, other: object) -> bool:
        """Equal to another view, or to a :class:`~ckms.controller.models.Key`, of the same
        key as stored."""
        if isinstance(other, KeyView | Key):
            mine = other if isinstance(other, Key) else other.to_model()
            return self.to_model() == mine
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


AnyKey: TypeAlias = Key | KeyView
"""What the read-only rules (desired state, due work, replies) take: a model or a view."""
AnyVersion: TypeAlias = KeyVersion | VersionView
