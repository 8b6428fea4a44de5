"""Canonical JSON as part of the wire protocol: the public name of :mod:`ckms._canonical`.

The encoding itself lives below both :mod:`ckms.crypto` and :mod:`ckms.protocol`, because the
crypto recipes bind canonical JSON into AAD and HPKE info; this module re-exports it so callers
of the protocol keep one import.
"""

from __future__ import annotations

from ckms._canonical import MAX_CANONICAL_BYTES, MAX_DEPTH, canonical_json, parse_canonical_json

__all__ = ["MAX_CANONICAL_BYTES", "MAX_DEPTH", "canonical_json", "parse_canonical_json"]
