"""A secret string field for wire models: hidden from ``repr``/``str``, sent as plain JSON.

Shares, passphrases and enrollment tokens ride in request bodies. As pydantic ``SecretStr`` no
``repr``, f-string, traceback local or log of the model shows them; only a JSON dump (what goes
on the wire) and an explicit ``.get_secret_value()`` reveal the value.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import PlainSerializer, SecretStr

__all__ = ["WireSecret"]


def _reveal(value: SecretStr) -> str:
    return value.get_secret_value()


WireSecret = Annotated[SecretStr, PlainSerializer(_reveal, return_type=str, when_used="json")]
"""``SecretStr`` that serialises to its value in JSON mode (the request body) only."""
