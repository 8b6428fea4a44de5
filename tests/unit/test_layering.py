"""The package layering of docs/architecture.md, checked on the source (imports only)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(package: str) -> dict[str, set[str]]:
    """Every ckms/agent module a package's files import, by file."""
    base = ROOT / package.replace(".", "/")
    files = [base.with_suffix(".py")] if base.with_suffix(".py").exists() else base.rglob("*.py")
    out: dict[str, set[str]] = {}
    for path in files:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module in ("ckms", "ckms_agent"):  # from ckms import errors
                    names.update(f"{node.module}.{alias.name}" for alias in node.names)
                else:
                    names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        out[str(path.relative_to(ROOT))] = {
            n for n in names if n.split(".")[0] in ("ckms", "ckms_agent")
        }
    return out


def _offenders(package: str, allowed: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{file}: {name}"
        for file, names in _imports(package).items()
        for name in names
        if not any(name == a or name.startswith(a + ".") for a in allowed)
    )


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        ("ckms._canonical", ("ckms.errors",)),
        ("ckms._logging", ()),
        ("ckms._gc", ()),
        ("ckms._lazy", ()),
        ("ckms.crypto", ("ckms.crypto", "ckms.errors", "ckms._canonical", "ckms._lazy")),
        ("ckms.protocol", ("ckms.protocol", "ckms.crypto", "ckms.errors", "ckms._canonical")),
        (
            "ckms.store",
            ("ckms.store", "ckms.protocol", "ckms.crypto", "ckms.errors", "ckms._canonical"),
        ),
        # The CLI is a client: it speaks the protocol and may start a controller, make its
        # home (init, restore) or run the store tools (migrate, copy), nothing else of the
        # controller's internals (wire rules live in ckms.protocol). It reads the audit
        # anchor topic itself (ckms._kafka) so an auditor needs no controller to check an export.
        (
            "ckms.cli",
            (
                "ckms.cli",
                "ckms._aio",
                "ckms._gc",
                "ckms.protocol",
                "ckms.crypto",
                "ckms.errors",
                "ckms._logging",
                "ckms._hardening",
                "ckms._kafka",
                "ckms._kafka_security",
                "ckms.ssh",
                "ckms.store",
                "ckms.devkafka",
                "ckms.demo",
                "ckms.controller.home",
                "ckms.controller.restore",
                "ckms.controller.service",
                "ckms.controller.storetools",
                "ckms.console",
            ),
        ),
        # The console is a client too: the CLI's connection and parsers, the protocol.
        (
            "ckms.console",
            ("ckms.console", "ckms.cli", "ckms.protocol", "ckms.crypto", "ckms.errors"),
        ),
    ],
)
def test_packages_import_only_the_layers_below(package: str, allowed: tuple[str, ...]) -> None:
    assert _offenders(package, allowed) == []


def test_controller_and_agent_never_import_each_other() -> None:
    assert _offenders("agents.ckms_agent", ("ckms_agent", "ckms")) == []
    assert [o for o in _offenders("ckms", ("ckms",)) if "ckms_agent" in o] == []
    agent_uses_controller = [
        o for o in _offenders("agents.ckms_agent", ("ckms_agent",)) if "ckms.controller" in o
    ]
    assert agent_uses_controller == []


def test_crypto_imports_first_without_the_protocol() -> None:
    """No hidden cycle: the crypto recipes load on their own, before anything above them."""
    code = "import sys, ckms.crypto; print('ckms.protocol' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"


def test_comments_cite_only_documents_the_repository_has() -> None:
    """Design and style notes outside the repository are not cited; docs/architecture.md is."""
    cited = sorted(
        f"{path.relative_to(ROOT)}:{n}"
        for top in ("ckms", "agents", "tests", "bench", "docs")
        for path in (ROOT / top).rglob("*")
        if path.suffix in (".py", ".md") and path.is_file()
        for n, line in enumerate(path.read_text("utf-8", "replace").splitlines(), 1)
        if re.search(r"\b(DESIGN|STYLE) §", line)
    )
    assert cited == []
