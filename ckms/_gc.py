"""Garbage collection without event-loop stalls when many objects live long.

A full collection walks every tracked object that is not frozen, holding the GIL (and so the
event loop) for all of it: about 0.3 µs an object, so hundreds of ms once the key view holds
100,000 keys. Two remedies, used where such objects are made:

- :func:`paused`: no collection while a large, long-lived set of objects is being built (each
  pass would walk what was built so far); nested and concurrent pauses are counted, the
  collector comes back when the last ends.
- :func:`freeze`: move every object alive now out of the collector's sight
  (:func:`gc.freeze`). Objects frozen are still freed by their reference counts; only a
  reference cycle among them would never be, so only objects that form none are frozen this
  way (the key view, the modules loaded at start).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["freeze", "paused", "settle"]

_pauses = 0
_was_enabled = False


@contextmanager
def paused() -> Iterator[None]:
    """No garbage collection inside the block (or any block paused meanwhile)."""
    global _pauses, _was_enabled
    if _pauses == 0:
        _was_enabled = gc.isenabled()
        gc.disable()
    _pauses += 1
    try:
        yield
    finally:
        _pauses -= 1
        if _pauses == 0 and _was_enabled:
            gc.enable()


def freeze() -> None:
    """Take every object alive now out of later collections (see the module docstring)."""
    gc.freeze()


def settle() -> None:
    """Collect once, then :func:`freeze` what is left (at start, when a pause costs nothing):
    the modules, settings and services of a process live as long as it does, and no later
    collection needs to walk them again."""
    gc.collect()
    gc.freeze()
