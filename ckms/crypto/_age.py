"""age encryption of custodian shares to their SSH keys (the ``pyrage`` binding of rage).

``ckms init --custodian NAME=KEY.pub`` encrypts each SLIP-39 share to one custodian's
``ssh-ed25519`` public key, so the shares never show on a terminal; the custodian decrypts with
the standard ``age`` tool (``age -d -i ~/.ssh/id_ed25519 share.age``) or ``ckms unseal
--identity``. The files are ASCII-armored age v1 (``-----BEGIN AGE ENCRYPTED FILE-----``).
Only ssh-ed25519 recipients are accepted: age's ssh-rsa support exists but ckms's operator keys
are Ed25519 and one kind is one thing to get right. A failure to decrypt is one
:class:`~ckms.errors.IntegrityError` whatever the cause (wrong key, edited file).
"""

from __future__ import annotations

import pyrage

from ckms.errors import ConfigError, IntegrityError

__all__ = ["AGE_ARMOR_HEADER", "age_decrypt_ssh", "age_encrypt_to_ssh", "is_age_file"]

AGE_ARMOR_HEADER = "-----BEGIN AGE ENCRYPTED FILE-----"
_AGE_BINARY_HEADER = b"age-encryption.org/v1\n"


def _recipient(public_line: str) -> pyrage.ssh.Recipient:
    fields = public_line.split()
    if len(fields) < 2 or fields[0] != "ssh-ed25519":
        raise ConfigError("an age recipient must be an ssh-ed25519 public key line")
    try:
        return pyrage.ssh.Recipient.from_str(" ".join(fields[:2]))
    except pyrage.RecipientError:
        raise ConfigError("not a valid ssh-ed25519 public key") from None


def age_encrypt_to_ssh(plaintext: bytes, public_line: str) -> str:
    """Encrypt ``plaintext`` to one ssh-ed25519 public key; return the armored age file."""
    recipient = _recipient(public_line)
    try:
        return bytes(pyrage.encrypt(plaintext, [recipient], armored=True)).decode("ascii")
    except pyrage.EncryptError:
        raise ConfigError("age encryption failed") from None


def age_decrypt_ssh(ciphertext: bytes, private_key_openssh: bytes) -> bytes:
    """Decrypt an age file (armored or binary) with an unencrypted OpenSSH private key."""
    try:
        identity = pyrage.ssh.Identity.from_buffer(private_key_openssh)
    except pyrage.IdentityError:
        raise ConfigError("the identity is not an unencrypted OpenSSH private key") from None
    try:
        return bytes(pyrage.decrypt(ciphertext, [identity]))
    except pyrage.DecryptError:
        raise IntegrityError("cannot decrypt the age file with this identity") from None


def is_age_file(data: bytes) -> bool:
    """True when ``data`` looks like an age file (armored or binary)."""
    return data.lstrip().startswith(AGE_ARMOR_HEADER.encode()) or data.startswith(
        _AGE_BINARY_HEADER
    )
