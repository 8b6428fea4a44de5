"""JSON Schemas of the signed envelope and of every event's ``data``, generated from the models.

``python -m ckms.protocol.schemas`` (or ``make schemas``) writes them to ``docs/schemas/`` and
the copy the Go example embeds; ``--check`` exits 1 when a file is missing or stale, which a
test runs, so a model change cannot land without its published schema.

What the schemas cannot say, the spec (``docs/events.md``) does: the envelope is checked in a
fixed order with one reason per refusal, integers are JSON integers (``3``, never ``3.0``), and
a key's ``targets.env`` must agree with the ``env`` its selectors name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic.json_schema import models_json_schema

from ckms.protocol._envelope import _TIME_RE, ENVELOPE_VERSION, MAX_SEQ
from ckms.protocol._events import EVENT_DATA_MODELS, EventType

__all__ = ["DRAFT", "OUTPUTS", "build_schemas", "main"]

DRAFT = "https://json-schema.org/draft/2020-12/schema"

OUTPUTS = (Path("docs/schemas"), Path("examples/go-consumer/schemas"))
"""Where the schemas go, relative to the repository root: the published copy and the one the
Go consumer embeds (``go:embed`` cannot reach outside its module)."""


def _data_defs() -> tuple[dict[EventType, str], dict[str, Any]]:
    """One ``$defs`` table for every data model, and the name of each event type's model."""
    models = [(model, "validation") for model in EVENT_DATA_MODELS.values()]
    refs, top = models_json_schema(models, by_alias=True, ref_template="#/$defs/{model}")
    names = {
        etype: refs[(model, "validation")]["$ref"].removeprefix("#/$defs/")
        for etype, model in EVENT_DATA_MODELS.items()
    }
    return names, top["$defs"]


def _envelope(names: dict[EventType, str], defs: dict[str, Any]) -> dict[str, Any]:
    return {
        "$schema": DRAFT,
        "title": "ckms signed envelope",
        "description": (
            "The Kafka value of every ckms event and ack: canonical JSON of this object, signed "
            "with Ed25519 over its exact bytes (headers ckms-sig, ckms-kid). docs/events.md is "
            "the specification; this schema is its machine-readable part."
        ),
        "type": "object",
        "additionalProperties": False,
        "required": ["v", "id", "seq", "type", "at", "data"],
        "properties": {
            "v": {"type": "integer", "const": ENVELOPE_VERSION},
            "id": {"type": "string", "description": "Unique per event (a UUID)."},
            "seq": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_SEQ,
                "description": "Grows with every event a controller commits; see the replay rule.",
            },
            "type": {"enum": [str(t) for t in EventType]},
            "at": {
                "type": "string",
                "pattern": f"^{_TIME_RE.pattern}$",
                "description": "UTC time with exactly six fractional digits and Z.",
            },
            "data": {"type": "object"},
        },
        "allOf": [
            {
                "if": {"properties": {"type": {"const": str(etype)}}, "required": ["type"]},
                "then": {"properties": {"data": {"$ref": f"#/$defs/{names[etype]}"}}},
            }
            for etype in EventType
        ],
        "$defs": defs,
    }


def _standalone(etype: EventType, names: dict[EventType, str], defs: dict[str, Any]) -> Any:
    """The schema of one type's ``data`` alone, with the definitions it uses."""
    root = dict(defs[names[etype]])
    used: dict[str, Any] = {}
    pending = [root]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.removeprefix("#/$defs/") not in used:
                name = ref.removeprefix("#/$defs/")
                used[name] = defs[name]
                pending.append(defs[name])
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    out: dict[str, Any] = {"$schema": DRAFT, "title": f"{etype} data", **root}
    if used:
        out["$defs"] = dict(sorted(used.items()))
    return out


def build_schemas() -> dict[str, dict[str, Any]]:
    """Every schema file by name: ``envelope.json`` and ``<event type>.json``."""
    names, defs = _data_defs()
    files = {"envelope.json": _envelope(names, defs)}
    for etype in EventType:
        files[f"{etype}.json"] = _standalone(etype, names, defs)
    return files


def _render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _checkout() -> Path:
    """The repository this module runs from, else the current directory."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "docs").is_dir() else Path()


def main(argv: list[str] | None = None) -> int:
    """Write the schemas under the repository root, or with ``--check`` report stale ones."""
    parser = argparse.ArgumentParser(prog="python -m ckms.protocol.schemas", description=__doc__)
    parser.add_argument(
        "--root", type=Path, default=_checkout(), help="repository root (default: this checkout)"
    )
    parser.add_argument("--check", action="store_true", help="only report files that differ")
    args = parser.parse_args(argv)
    files = {name: _render(schema) for name, schema in build_schemas().items()}
    stale: list[Path] = []
    for out in OUTPUTS:
        directory = args.root / out
        present = {p.name for p in directory.glob("*.json")} if directory.is_dir() else set()
        for name, text in files.items():
            path = directory / name
            current = path.read_text(encoding="utf-8") if path.exists() else None
            if current != text:
                stale.append(path)
                if not args.check:
                    directory.mkdir(parents=True, exist_ok=True)
                    path.write_text(text, encoding="utf-8")
        for name in sorted(present - files.keys()):
            stale.append(directory / name)
            if not args.check:
                (directory / name).unlink()
    if args.check and stale:
        print("stale JSON Schemas (run `make schemas`):", *map(str, stale), sep="\n  ")
        return 1
    for path in stale:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
