"""The PostgreSQL launcher fails at once, naming what to install, when the server is missing."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ckms.devpostgres import LocalPostgres, find_postgres_bin
from ckms.errors import DependencyMissingError, StoreError


def test_no_binaries_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKMS_POSTGRES_BIN", raising=False)
    (tmp_path / "16" / "bin").mkdir(parents=True)  # a major without its server binaries
    with pytest.raises(DependencyMissingError, match=r"apt-get install postgresql"):
        find_postgres_bin(root=tmp_path, path="")


async def test_an_empty_bin_dir_fails_before_anything_is_made(tmp_path: Path) -> None:
    pg = LocalPostgres(bin_dir=tmp_path)
    with pytest.raises(DependencyMissingError, match=r"not in .*apt-get install postgresql"):
        await pg.start()
    assert pg.directory is None


def test_the_newest_major_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKMS_POSTGRES_BIN", raising=False)
    for major in ("9.6", "15", "17"):
        bin_dir = tmp_path / major / "bin"
        bin_dir.mkdir(parents=True)
        for name in ("initdb", "postgres", "pg_isready"):
            (bin_dir / name).write_text("#!/bin/sh\n")
            os.chmod(bin_dir / name, 0o700)
    assert find_postgres_bin(root=tmp_path, path="") == tmp_path / "17" / "bin"
    monkeypatch.setenv("CKMS_POSTGRES_BIN", str(tmp_path / "15" / "bin"))
    assert find_postgres_bin(root=tmp_path, path="") == tmp_path / "15" / "bin"
    monkeypatch.setenv("CKMS_POSTGRES_BIN", str(tmp_path / "missing"))
    with pytest.raises(DependencyMissingError, match=r"CKMS_POSTGRES_BIN=.*missing"):
        find_postgres_bin(root=tmp_path, path="")


async def test_a_failed_start_names_the_log_it_keeps() -> None:
    # Not pytest's tmp_path: under root the programs run as the server's user, who must reach
    # them (pytest's 0700 parents are closed to it).
    work = Path(tempfile.mkdtemp(prefix="ckms-pg-test-"))
    try:
        pg = LocalPostgres(bin_dir=_failing_bin_dir(work), data_dir=work / "pg")
        with pytest.raises(StoreError, match=r"initdb failed \(exit 3\); see .*postgres\.log"):
            await pg.start()
        assert "no space left" in _read(pg.log_path)
        assert pg.pid is None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _read(path: Path) -> str:
    return path.read_text()


def _failing_bin_dir(work: Path) -> Path:
    """Server programs that fail as initdb does when the disk is full."""
    work.chmod(0o755)  # the server's user must reach them
    bin_dir = work / "bin"
    bin_dir.mkdir(mode=0o755)
    for name in ("initdb", "postgres", "pg_isready"):
        (bin_dir / name).write_text("#!/bin/sh\necho 'initdb: no space left' >&2\nexit 3\n")
        os.chmod(bin_dir / name, 0o755)  # noqa: S103
    return bin_dir
