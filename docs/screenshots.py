"""Make the README's console screenshots (docs/img/console-*.png) from a real run.

It runs the console's end-to-end test with ``CKMS_CONSOLE_SCREENSHOTS`` set: a real controller,
two real agents and a real local Kafka, the real ``ckms console`` driven by Debian's headless
Chromium, which saves the overview and the key page after a rotation converged. Nothing is
drawn by hand. Run from the repository root: ``.venv/bin/python docs/screenshots.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img"


def main() -> int:
    env = {**os.environ, "CKMS_CONSOLE_SCREENSHOTS": str(OUT)}
    test = "tests/e2e/test_console.py::test_console_end_to_end"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", test, "-q", "-p", "no:randomly"], cwd=ROOT, env=env
    )
    if result.returncode == 0:
        for png in sorted(OUT.glob("console-*.png")):
            print(png.relative_to(ROOT))
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
