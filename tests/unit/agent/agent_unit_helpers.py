"""Helpers for the agent's unit tests: a valid config without any server behind it."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from ckms.crypto import generate_signing_key, signer_key_id, signing_public_key


def config_values(state_dir: Path, **overrides: Any) -> dict[str, Any]:
    """The settings `ckms-agent enroll` would write, as a dict (tests change single fields)."""
    public = signing_public_key(generate_signing_key())
    values: dict[str, Any] = {
        "host_id": "web-1",
        "labels": {"env": "test", "role": "web"},
        "controller_host": "127.0.0.1",
        "controller_port": 2222,
        "host_key_fingerprint": "SHA256:" + "A" * 43,
        "controller_signing_key": base64.b64encode(public).decode(),
        "controller_key_id": signer_key_id(public),
        "kafka_bootstrap": "127.0.0.1:9092",
        "state_dir": str(state_dir),
    }
    values.update(overrides)
    return values
