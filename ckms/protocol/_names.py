"""Wire rules for names: key names, host ids and host labels.

Controller and CLI check names with these same functions, so the client refuses exactly what
the server would refuse, with the same words, before a request is sent.
"""

from __future__ import annotations

from ckms.errors import ConfigError
from ckms.protocol._keyspec import _HOST_ID_RE, _LABEL_RE, _LABEL_VALUE_RE, KEY_NAME_RE

__all__ = ["parse_labels", "validate_host_name", "validate_key_name", "validate_labels"]


def validate_key_name(name: object) -> str:
    """Return ``name`` if it is a valid ``team/purpose`` key name, else raise ConfigError."""
    if not isinstance(name, str) or not KEY_NAME_RE.match(name) or ".." in name:
        shown = name if isinstance(name, str) and len(name) <= 80 else "<invalid>"
        raise ConfigError(
            f"key name {shown!r} must be 'team/purpose': two segments of lowercase letters, "
            "digits, '.', '_' or '-', each 1-64 characters, starting and ending alphanumeric"
        )
    return name


def validate_host_name(name: str) -> str:
    """Return ``name`` if it is a valid host id, else raise ConfigError."""
    if not isinstance(name, str) or not _HOST_ID_RE.match(name):
        raise ConfigError(
            f"host name {name!r} must be 1-128 letters, digits, '.', '_', ':' or '-', "
            "starting and ending with a letter or digit"
        )
    return name


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    """Return the labels (sorted) if every name and value is valid, else raise ConfigError."""
    for label, value in labels.items():
        if not _LABEL_RE.match(label):
            raise ConfigError(f"invalid label name {label!r}")
        if not _LABEL_VALUE_RE.match(value):
            raise ConfigError(f"invalid value {value!r} for label {label!r}")
    return dict(sorted(labels.items()))


def parse_labels(specs: list[str]) -> dict[str, str]:
    """Parse and check ``env=prod`` style label arguments (comma-separated pairs allowed)."""
    labels: dict[str, str] = {}
    for spec in specs:
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            if not sep or not name.strip():
                raise ConfigError(f"label {part!r}: expected name=value")
            labels[name.strip()] = value.strip()
    return validate_labels(labels)
