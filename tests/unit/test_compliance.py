"""docs/compliance.md and the requirement markers on tests say the same thing."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "compliance.md"
_ROW = re.compile(r"^\| `(?P<id>[A-Z][A-Za-z0-9.-]+)` \|(?P<rest>.*)\|$")
_TEST = re.compile(r"`(tests/[\w/]+\.py::\w+)`")


def documented() -> dict[str, set[str]]:
    """Requirement id → the tests the document names for it."""
    out: dict[str, set[str]] = {}
    for line in DOC.read_text("utf-8").splitlines():
        row = _ROW.match(line)
        if row:
            out[row["id"]] = set(_TEST.findall(row["rest"]))
    return out


def marked() -> dict[str, set[str]]:
    """Requirement id → every test carrying ``@pytest.mark.requirement(id, ...)``."""
    out: dict[str, set[str]] = defaultdict(set)
    for path in (ROOT / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for deco in node.decorator_list:
                if (
                    isinstance(deco, ast.Call)
                    and isinstance(deco.func, ast.Attribute)
                    and deco.func.attr == "requirement"
                ):
                    for arg in deco.args:
                        assert isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                        out[arg.value].add(f"{path.relative_to(ROOT)}::{node.name}")
    return dict(out)


def test_every_documented_requirement_has_a_test_and_every_marker_is_documented() -> None:
    doc, marks = documented(), marked()
    assert doc, "no requirement rows found in docs/compliance.md"
    assert sorted(set(marks) - set(doc)) == [], "markers naming requirements the doc lacks"
    assert sorted(r for r in doc if not marks.get(r)) == [], "requirements without a test"


def test_the_tests_the_document_names_carry_its_requirement() -> None:
    doc, marks = documented(), marked()
    missing = sorted(
        f"{rid}: {test}" for rid, tests in doc.items() for test in tests - marks.get(rid, set())
    )
    assert missing == []
    assert all(doc.values()), "a requirement row names no test"


def test_the_document_says_what_is_not_met() -> None:
    text = DOC.read_text("utf-8")
    assert "## Not met" in text
    assert "FIPS 140-3" in text.split("## Not met", 1)[1]
