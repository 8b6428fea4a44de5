"""``ckms key import --file`` / ``key rotate --import-file``: the CLI reads at most a key file's
bound, whatever the path names (a pipe or device reports size 0 and would be read whole)."""

from __future__ import annotations

import base64
import os
import threading
from pathlib import Path

import pytest

from ckms.cli._errors import UsageError
from ckms.cli.key import read_import_file
from ckms.protocol.admin import MAX_IMPORT_BYTES


def test_a_regular_file_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "k.bin"
    path.write_bytes(b"\x01" * 32)
    assert base64.b64decode(read_import_file(path)) == b"\x01" * 32


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"\x00" * (MAX_IMPORT_BYTES + 1))
    with pytest.raises(UsageError, match="at most"):
        read_import_file(path)


def test_a_pipe_is_read_only_up_to_the_bound(tmp_path: Path) -> None:
    """A FIFO (like /dev/zero, or a process substitution) has st_size 0: the size check let
    it through and the CLI read all of it into memory before anything refused it."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    written: list[int] = []

    def feed() -> None:
        with fifo.open("wb") as w:
            try:
                for _ in range(64):  # 64 x the bound, far more than a key file
                    w.write(b"\x00" * MAX_IMPORT_BYTES)
                    written.append(1)
            except BrokenPipeError:
                pass  # the reader stopped at the bound

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    with pytest.raises(UsageError, match="at most"):
        read_import_file(fifo)
    feeder.join(timeout=10)
    assert not feeder.is_alive()
    assert len(written) < 64
