"""The ``ckms`` command line: noun, then verb, thin over the library."""

from __future__ import annotations

from ckms.cli._app import app, main

__all__ = ["app", "main"]
