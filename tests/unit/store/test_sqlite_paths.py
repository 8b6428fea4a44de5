"""Files opened read-only through SQLite URIs are the files named, whatever their names hold.

``file:{path}?mode=ro`` lets a ``?`` or ``#`` in the path start the query: a restore of
``backup.db?x=1`` checked (integrity, schema, initialised) ``backup.db`` -- another file, even
created empty on the spot -- then copied the one it was given."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ckms.controller.backup import inspect_backup
from ckms.errors import ConfigError


@pytest.mark.parametrize("name", ["backup.db?x=1", "backup.db#frag", "back%75p.db"])
def test_a_backup_is_inspected_as_the_file_it_names(tmp_path: Path, name: str) -> None:
    named = tmp_path / name
    with sqlite3.connect(named) as db:
        db.execute("CREATE TABLE junk (x)")  # not a ckms store
    decoy = tmp_path / "backup.db"
    with pytest.raises(ConfigError, match="not a ckms controller store"):
        inspect_backup(named)
    if name != "back%75p.db":
        assert not decoy.exists(), "inspecting created another file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
