"""The agent's own keys: an Ed25519 identity seed and an HPKE wrapping key, each a 0600 file;
and the fleet's digest key the controller hands it, also a 0600 file.

The identity seed is stored raw (32 bytes) once and serves two jobs (docs/architecture.md §5):
SSH client authentication (converted to OpenSSH form in memory) and signing acks. The wrapping
key opens material the controller wraps for this agent only. The digest key (32 bytes,
HPKE-wrapped to this agent in transit) keys the material digests events name, so the agent can
check what it fetched. None of them is ever logged or put in the state DB.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from ckms.crypto import (
    WrapSuite,
    generate_signing_key,
    generate_wrapping_keypair,
    signing_key_openssh,
    signing_public_key,
    unwrap_for_agent,
    wrapping_public_key,
)
from ckms.errors import CKMSError, ConfigError, IntegrityError
from ckms.protocol import DIGEST_KEY_WRAP_NAME, DIGEST_KEY_WRAP_VERSION
from ckms_agent.files import InstallError, write_atomic


@dataclass(frozen=True)
class AgentKeys:
    """The private keys of one agent (reprs never show them)."""

    identity: bytes = field(repr=False)
    wrapping: bytes = field(repr=False)
    suite: WrapSuite = WrapSuite.X25519

    @property
    def identity_public(self) -> bytes:
        """Raw Ed25519 public key: what the controller verifies acks with."""
        return signing_public_key(self.identity)

    @property
    def wrapping_public(self) -> bytes:
        """Raw wrapping public key: what the controller wraps material to."""
        return wrapping_public_key(self.wrapping, self.suite)

    def ssh_key(self) -> asyncssh.SSHKey:
        """The identity as an asyncssh key for SSH public-key authentication."""
        try:
            return asyncssh.import_private_key(signing_key_openssh(self.identity))
        except (asyncssh.KeyImportError, CKMSError):
            raise ConfigError("the agent identity key cannot be used for SSH") from None


def create_keys(identity_path: Path, wrapping_path: Path, suite: WrapSuite) -> AgentKeys:
    """Make a new identity and wrapping key and write them (0600, directory 0700)."""
    keys = AgentKeys(generate_signing_key(), generate_wrapping_keypair(suite)[0], suite)
    for path, data in ((identity_path, keys.identity), (wrapping_path, keys.wrapping)):
        try:
            write_atomic(path, data, mode=0o600, dir_mode=0o700)
        except InstallError as exc:
            raise ConfigError(f"cannot write agent key: {exc}") from None
    return keys


def _read_private(path: Path, what: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist (was this host enrolled?)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as src:
        if os.fstat(src.fileno()).st_mode & 0o077:
            raise ConfigError(f"{what} {path} is readable by others: chmod 600 it")
        return src.read()


def load_keys(identity_path: Path, wrapping_path: Path, suite: WrapSuite) -> AgentKeys:
    """Read the agent's keys, refusing files others can read or of the wrong shape."""
    identity = _read_private(identity_path, "identity key")
    wrapping = _read_private(wrapping_path, "wrapping key")
    keys = AgentKeys(identity, wrapping, suite)
    try:
        keys.identity_public  # noqa: B018 - validates the seed
    except CKMSError:
        raise ConfigError(f"identity key {identity_path} is not a raw Ed25519 seed") from None
    try:
        keys.wrapping_public  # noqa: B018 - validates the wrapping key for its suite
    except CKMSError:
        raise ConfigError(f"wrapping key {wrapping_path} is not a valid {suite} key") from None
    return keys


DIGEST_KEY_BYTES = 32


def unwrap_digest_key(wrapping_key: bytes, wrapped_b64: str, *, host_id: str) -> bytes:
    """Open the digest key the controller wrapped to this agent (IntegrityError if it is not)."""
    try:
        blob = base64.b64decode(wrapped_b64, validate=True)
    except (binascii.Error, ValueError):
        raise IntegrityError("the wrapped digest key is not base64") from None
    key = unwrap_for_agent(
        wrapping_key,
        blob,
        key_name=DIGEST_KEY_WRAP_NAME,
        version=DIGEST_KEY_WRAP_VERSION,
        agent_id=host_id,
    )
    if len(key) != DIGEST_KEY_BYTES:
        raise IntegrityError("the digest key the controller sent is not 32 bytes")
    return key


def save_digest_key(path: Path, key: bytes) -> None:
    """Write the digest key (0600, directory 0700)."""
    try:
        write_atomic(path, key, mode=0o600, dir_mode=0o700)
    except InstallError as exc:
        raise ConfigError(f"cannot write the digest key: {exc}") from None


def load_digest_key(path: Path) -> bytes | None:
    """Read the digest key; None when this host has none yet (enrolled before digests were
    keyed: it asks the controller once)."""
    if not path.exists():
        return None
    key = _read_private(path, "digest key")
    if len(key) != DIGEST_KEY_BYTES:
        raise ConfigError(f"digest key {path} is not 32 bytes")
    return key
