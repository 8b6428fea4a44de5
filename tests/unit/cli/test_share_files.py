"""``ckms unseal --share-file NAME.age``: decrypted locally with the custodian's SSH key,
including a passphrase-protected one (as custodians' keys usually are)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import typer

from ckms.cli import vault
from ckms.cli._errors import UsageError
from ckms.crypto import age_encrypt_to_ssh
from ckms.errors import ConfigError, IntegrityError

SHARE = "academic acid acne acquire acrobat"

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="no ssh-keygen")


def keygen(path: Path, passphrase: str = "") -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path.with_suffix(".pub").read_text()


def test_a_share_file_opens_with_a_passphrase_protected_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    public = keygen(tmp_path / "id", "custodian secret")
    (tmp_path / "carol.age").write_text(age_encrypt_to_ssh(SHARE.encode(), public))
    asked: list[str] = []

    def prompt(text: str, **kw: object) -> str:
        asked.append(text)
        assert kw.get("hide_input") is True
        return "custodian secret"

    monkeypatch.setattr(typer, "prompt", prompt)
    assert vault._read_share(tmp_path / "carol.age", tmp_path / "id") == SHARE
    assert len(asked) == 1
    monkeypatch.setattr(typer, "prompt", lambda text, **kw: "wrong")
    with pytest.raises(ConfigError, match="wrong passphrase"):
        vault._read_share(tmp_path / "carol.age", tmp_path / "id")


def test_another_key_or_a_plain_file(tmp_path: Path) -> None:
    public = keygen(tmp_path / "mine")
    keygen(tmp_path / "other")
    (tmp_path / "s.age").write_text(age_encrypt_to_ssh(SHARE.encode(), public))
    with pytest.raises(IntegrityError, match="cannot decrypt"):
        vault._read_share(tmp_path / "s.age", tmp_path / "other")
    (tmp_path / "plain").write_text(SHARE + "\n")
    assert vault._read_share(tmp_path / "plain", tmp_path / "other") == SHARE
    with pytest.raises(UsageError, match="cannot read"):
        vault._read_share(tmp_path / "missing", tmp_path / "other")
