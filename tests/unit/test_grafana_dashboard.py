"""The Grafana dashboard only queries series that ckms exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "ckms.json"
SOURCES = [
    Path(__file__).resolve().parents[2] / "ckms" / "controller" / "metrics.py",
    Path(__file__).resolve().parents[2] / "agents" / "ckms_agent" / "metrics.py",
]
SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def test_every_queried_series_is_exported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = set(re.findall(r'"(ckms_[a-z_]+)"', "".join(p.read_text() for p in SOURCES)))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        for name in re.findall(r"\bckms_[a-z_]+", expr):
            base = next((name.removesuffix(s) for s in SUFFIXES if name.endswith(s)), name)
            assert base in exported, f"{name} in {expr!r} is not exported"
