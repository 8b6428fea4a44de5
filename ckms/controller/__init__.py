"""ckms.controller: the controller's key lifecycle, policies, sealing and its services.

Public entry points: :class:`~ckms.controller.lifecycle.Lifecycle`,
:class:`~ckms.controller.sealing.Vault` with :func:`~ckms.controller.sealing.init_controller`,
:func:`~ckms.controller.duework.due_work`, and the models in :mod:`ckms.controller.models`.
"""

from ckms.controller.duework import DueItem, DueWork, due_work, plan_due_work
from ckms.controller.lifecycle import TRANSITIONS, Lifecycle, Op
from ckms.controller.models import (
    Host,
    InstallSpec,
    Key,
    KeyState,
    KeyVersion,
    Policy,
    RevocationReason,
    Targets,
    Usage,
)
from ckms.controller.policy import default_policy
from ckms.controller.sealing import InitResult, Vault, init_controller
from ckms.controller.targets import host_matches, match_hosts

__all__ = [
    "TRANSITIONS",
    "DueItem",
    "DueWork",
    "Host",
    "InitResult",
    "InstallSpec",
    "Key",
    "KeyState",
    "KeyVersion",
    "Lifecycle",
    "Op",
    "Policy",
    "RevocationReason",
    "Targets",
    "Usage",
    "Vault",
    "default_policy",
    "due_work",
    "host_matches",
    "init_controller",
    "match_hosts",
    "plan_due_work",
]
