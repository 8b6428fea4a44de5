"""SSH keys: Ed25519 host and identity keys on disk (mode 0600), fingerprints, public text."""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh

from ckms.errors import ConfigError


def generate_ssh_key() -> asyncssh.SSHKey:
    """A new Ed25519 SSH key (host key or identity)."""
    return asyncssh.generate_private_key("ssh-ed25519")


def write_private_key(path: Path, key: asyncssh.SSHKey) -> None:
    """Write a private key in OpenSSH format with mode 0600 (created that way, never looser)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = key.export_private_key("openssh")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    (path.parent / (path.name + ".pub")).write_bytes(key.export_public_key("openssh"))


class KeyPassphraseNeeded(ConfigError):
    """Raised when a private key file is encrypted and no passphrase was given."""


def load_private_key(path: Path, passphrase: str | None = None) -> asyncssh.SSHKey:
    """Load a private key (decrypting it with ``passphrase``), refusing one others can read."""
    try:
        mode = path.stat().st_mode & 0o077
        if mode:
            raise ConfigError(f"private key {path} is readable by others (chmod 600 it)")
        return asyncssh.read_private_key(str(path), passphrase)
    except FileNotFoundError:
        raise ConfigError(f"private key {path} does not exist") from None
    except (asyncssh.KeyEncryptionError, asyncssh.KeyImportError, OSError) as exc:
        encrypted = "passphrase" in str(exc).lower()
        if passphrase is None and encrypted:
            raise KeyPassphraseNeeded(f"private key {path} is encrypted") from None
        if isinstance(exc, asyncssh.KeyEncryptionError):
            raise ConfigError(f"cannot decrypt private key {path}: wrong passphrase") from None
        raise ConfigError(f"cannot load private key {path}: {exc}") from None


def load_or_create_host_key(path: Path) -> asyncssh.SSHKey:
    """The controller's persistent SSH host key, created on first start."""
    if not path.exists():
        write_private_key(path, generate_ssh_key())
    return load_private_key(path)


def fingerprint(key: asyncssh.SSHKey) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint, as `ssh-keygen -lf` prints it."""
    return str(key.get_fingerprint("sha256"))


def public_key_text(key: asyncssh.SSHKey) -> str:
    """The one-line OpenSSH public key (``ssh-ed25519 AAAA...``)."""
    return key.export_public_key("openssh").decode().strip()
