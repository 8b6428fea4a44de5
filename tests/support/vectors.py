"""The published known-answer vectors (docs/vectors/): one copy, read by every test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VECTORS_DIR = Path(__file__).resolve().parents[2] / "docs" / "vectors"


def load_vectors(name: str) -> Any:
    """Parse one vector file by name (``canonical_json.json``, ...)."""
    return json.loads((VECTORS_DIR / name).read_text(encoding="utf-8"))
