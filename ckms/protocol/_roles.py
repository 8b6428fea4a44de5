"""Who may do what: the roles of callers and the operations dual control can cover.

One typed vocabulary for the controller (routes, approvals, the operator table), the CLI
(option checks) and the wire models (``operator.add``, policy patches, events), so none of
them spells a role or an operation differently.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

__all__ = [
    "APPROVAL_OPERATIONS",
    "APPROVER_ROLES",
    "DEFAULT_APPROVALS",
    "OPERATOR_ROLES",
    "REQUESTER_ROLES",
    "ApprovalOperation",
    "Role",
]


class Role(StrEnum):
    """The role of whoever calls the controller over SSH."""

    ADMIN = "admin"
    OPERATOR = "operator"
    CUSTODIAN = "custodian"
    AUDITOR = "auditor"
    AGENT = "agent"
    ENROLL = "enroll"


OPERATOR_ROLES: Final = (Role.ADMIN, Role.OPERATOR, Role.CUSTODIAN, Role.AUDITOR)
"""Roles an operator can hold (``agent`` and ``enroll`` belong to hosts, never to people)."""

APPROVER_ROLES: Final = frozenset({Role.ADMIN, Role.CUSTODIAN})
"""Roles that may approve (or reject) another person's dual-control request."""

REQUESTER_ROLES: Final = frozenset({Role.ADMIN})
"""Roles that may ask for a dual-control operation (others are refused outright)."""


class ApprovalOperation(StrEnum):
    """Operations a policy can put under dual control (``role``: operator changes)."""

    CREATE = "create"
    ROTATE = "rotate"
    ACTIVATE = "activate"
    SUSPEND = "suspend"
    RESUME = "resume"
    REVOKE = "revoke"
    DESTROY = "destroy"
    POLICY = "policy"
    TARGETS = "targets"
    ROLE = "role"


class ControllerApproval(StrEnum):
    """Controller-wide operations the controller's settings can put under dual control
    (``approvals`` in ``controller.toml``): they concern no one key, so no key policy can."""

    CA = "ca"  # ca rotate, ca retire: what every host trusts
    BACKUP = "backup"  # backup create: the whole store, in a file an admin fetches


APPROVAL_OPERATIONS: Final = tuple(ApprovalOperation)
"""Every operation dual control can cover, in a stable order (for messages and help)."""

DEFAULT_APPROVALS: Final[frozenset[ApprovalOperation]] = frozenset(
    {
        ApprovalOperation.DESTROY,
        ApprovalOperation.POLICY,
        ApprovalOperation.TARGETS,
        ApprovalOperation.ROLE,
    }
)
"""What a policy puts under dual control unless it says otherwise: destroy, policy and role
changes, and targets or install-spec changes (they decide which hosts get a key and where it
lands on them)."""
