"""Reading a secret from a file of its own: refused when others may read it.

Like a private key (``ckms.ssh.load_private_key``), a password file readable by group or
others is refused rather than used: the setting would otherwise work while leaking. Errors
name the file, never its content.
"""

from __future__ import annotations

from pathlib import Path

from ckms.errors import ConfigError


def read_secret_file(path: Path, what: str) -> str:
    """The secret in ``path`` (one trailing newline dropped); ConfigError when the file is
    missing, empty, or readable by anyone but its owner (``what`` names the setting)."""
    try:
        mode = path.stat().st_mode & 0o077
        if mode:
            raise ConfigError(
                f"{what} {path} is readable by others (mode {mode:03o} beyond the owner's): "
                "chmod 600 it"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {type(exc).__name__}") from None
    secret = text[:-1] if text.endswith("\n") else text
    if not secret or "\n" in secret:
        raise ConfigError(f"{what} {path} must hold the secret alone, on one line")
    return secret
