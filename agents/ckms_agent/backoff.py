"""The agent's retry delays: :class:`ckms._backoff.Backoff`, the one backoff ckms uses."""

from __future__ import annotations

from ckms._backoff import Backoff

__all__ = ["Backoff"]
