"""Long listings print fast and look the same: plain aligned columns laid out as the rich
table lays them out, and JSON exactly as the json module writes it."""

from __future__ import annotations

import json

import pytest

from ckms.cli import _render

COLUMNS = ["name", "type", "primary", "next rotation"]
ROWS = [
    ("team00/key-000000", "hmac-sha256", "v1 Active", "in 364d"),
    ("team/a", "aes-256", None, "-"),
    ("payments/db-long-name", "rsa-4096", "v12 Suspended", "2d ago"),
]


def test_plain_columns_are_laid_out_as_the_table_is(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _render.print_table(COLUMNS, ROWS)  # a screenful: rich's table
    table = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    monkeypatch.setattr(_render, "PLAIN_ROWS_ABOVE", 0)
    _render.print_table(COLUMNS, ROWS)  # a long listing: plain columns
    plain = capsys.readouterr().out.splitlines()
    assert plain == table
    assert plain[2].split() == ["team/a", "aes-256", "-", "-"]


@pytest.mark.parametrize(
    "value",
    [
        {"name": "team/k", "states": {"Active": 1, "Deactivated": 2}, "targets": [], "n": None},
        {"quote": 'a"b\\c\n\t\x01/', "nested": [{"b": 1, "a": [True, False]}], "e": {}},
        {"label": "café ☃", "b": "\u2028"},  # not ASCII: the json module's escapes
    ],
)
def test_json_text_is_what_json_dumps_writes(value: object) -> None:
    assert _render.json_text(value) == json.dumps(value, indent=2, sort_keys=True)
