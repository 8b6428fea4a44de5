"""Canonical JSON: the one byte encoding that ckms signs, hashes and binds as associated data.

A base encoding below both :mod:`ckms.crypto` (bound AAD and HPKE info, JWK and keyring files)
and :mod:`ckms.protocol` (signed messages); it imports nothing of ckms but the errors.
:mod:`ckms.protocol.canonical` is its public name.

Rules (a second implementation must follow them exactly; ``docs/vectors/canonical_json.json``
pins them):

- UTF-8, no byte order mark, no whitespace outside strings, separators ``,`` and ``:``.
- Object keys are strings, sorted by Unicode code point (Python ``str`` order; note this differs
  from RFC 8785, which sorts by UTF-16 code unit, only for keys with characters above U+FFFF).
- Strings are written as-is (``ensure_ascii=False``) except ``"``, ``\\`` and the control
  characters U+0000..U+001F, which are escaped as ``\\"``, ``\\\\``, ``\\b \\f \\n \\r \\t`` or
  ``\\u00XX`` (lowercase hex). Lone surrogates cannot be encoded and are refused.
- Integers in plain decimal of any size; ``true``, ``false``, ``null``; arrays keep their order.
- Finite floats use Python's shortest round-trip ``repr`` (``0.5``, ``1e+100``); NaN and the
  infinities are refused. Wire formats should prefer integers.

:func:`parse_canonical_json` accepts only input that is byte-for-byte what
:func:`canonical_json` would produce, so a signature over the bytes and the parsed value can
never disagree.
"""

from __future__ import annotations

import json
from typing import Any

from ckms.errors import ProtocolError

__all__ = ["MAX_CANONICAL_BYTES", "MAX_DEPTH", "canonical_json", "parse_canonical_json"]

MAX_CANONICAL_BYTES = 1 << 20
"""Default size limit of :func:`parse_canonical_json` input, so an oversized message is refused
before it is parsed."""

MAX_DEPTH = 32
"""Most arrays and objects :func:`parse_canonical_json` accepts nested in each other (``{}`` is
1, ``{"a":[1]}`` is 2; an event reaches 5). A fixed bound, so every implementation refuses the
same inputs, where Python's own limit would depend on the interpreter's stack."""

_SCALARS = (str, int, float, bool, type(None))
_PLAIN = frozenset(_SCALARS)
"""The scalar types themselves: a look-up by exact type, where most values end, is cheaper than
an ``isinstance`` call (subclasses, e.g. a ``StrEnum``, still pass through ``isinstance``)."""

_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
"""Made once: ``json.dumps`` with these options builds a new encoder on every call (every row MAC,
audit record and event is encoded here, thousands a second while onboarding keys)."""


def _check(obj: object) -> None:
    """Refuse anything that json would encode lossily or not at all, before encoding."""
    if type(obj) in _PLAIN or isinstance(obj, _SCALARS):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if type(key) is not str and not isinstance(key, str):
                raise ProtocolError(
                    f"canonical JSON object keys must be strings, not {type(key).__name__}"
                )
            if type(value) not in _PLAIN:
                _check(value)
        return
    if isinstance(obj, list | tuple):
        for item in obj:
            if type(item) not in _PLAIN:
                _check(item)
        return
    raise ProtocolError(f"cannot encode {type(obj).__name__} as canonical JSON")


_encode_str = json.encoder.encode_basestring
"""The json module's own string escape (its C one where built), as ``_ENCODER`` applies it."""
_int_text = int.__repr__
"""How json writes an int (an ``IntEnum`` too: as its value)."""
_FAST_DEPTH = 8
_LABELS: dict[str, str] = {}
"""``"key":`` of the object keys seen (field names, mostly: the same few thousand again and
again), up to ``_LABELS_MAX`` of them, so each is escaped once."""
_LABELS_MAX = 4096
_LABEL_CHARS_MAX = 64
"""Longer keys (text a peer chose) are escaped each time: the cache stays a few hundred KB."""


def _fast(obj: dict[Any, Any] | list[Any] | tuple[Any, ...], depth: int) -> str | None:
    """The text ``_ENCODER`` would make of ``obj``, or None where the general path must decide.

    Objects with keys of type ``str`` itself, arrays, strings, ints, booleans and null (nearly
    everything ckms encodes: every row MAC, audit record and event) are written here in one
    walk, with the same escape, number text and key order: a key version's row MAC body in
    2.9 µs instead of 4.4 µs for ``_check`` plus the encoder. Anything else (floats, mappings
    that are not dicts, keys of a str subclass, deep nesting) returns None: the general path
    encodes it or refuses it.
    """
    if type(obj) is dict:
        try:
            keys = sorted(obj)
        except TypeError:
            return None
        parts = []
        for key in keys:
            if type(key) is not str:
                # A str subclass (a StrEnum) goes the general way: its own ``==`` and hash
                # could match another key's cached text, and ties sort differently there.
                return None
            value = obj[key]
            kind = type(value)
            if kind is str:
                text = _encode_str(value)
            elif value is None:
                text = "null"
            elif kind is int:
                text = _int_text(value)
            else:
                found = _fast_value(value, depth)
                if found is None:
                    return None
                text = found
            label = _LABELS.get(key)
            if label is None:
                label = _encode_str(key) + ":"
                if len(key) <= _LABEL_CHARS_MAX and len(_LABELS) < _LABELS_MAX:
                    _LABELS[key] = label
            parts.append(label + text)
        return "{" + ",".join(parts) + "}"
    items = []
    for item in obj:
        found = _fast_value(item, depth)
        if found is None:
            return None
        items.append(found)
    return "[" + ",".join(items) + "]"


def _fast_value(value: object, depth: int) -> str | None:
    """One value for :func:`_fast` (None: the general path decides)."""
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return _int_text(value)
    if kind is dict or kind is list or kind is tuple:
        if depth >= _FAST_DEPTH:
            return None
        return _fast(value, depth + 1)  # type: ignore[arg-type]
    if isinstance(value, str):  # a StrEnum: json writes its value
        return _encode_str(value)
    if isinstance(value, int):  # an IntEnum: likewise
        return _int_text(value)
    return None


def canonical_json(obj: Any) -> bytes:
    """Encode ``obj`` as canonical JSON bytes so that equal values always sign to equal bytes."""
    try:
        text = _fast(obj, 0) if type(obj) is dict else None
        if text is not None:
            return text.encode("utf-8")
        _check(obj)
        return _ENCODER.encode(obj).encode("utf-8")
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError("value is nested too deeply for canonical JSON") from None
    except ValueError as exc:
        # allow_nan=False and lone surrogates (UnicodeEncodeError) both land here.
        reason = type(exc).__name__
        raise ProtocolError(f"cannot encode value as canonical JSON ({reason})") from None
    except TypeError:
        raise ProtocolError("cannot encode value as canonical JSON") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build an object, refusing a repeated key (json would silently keep the last one)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ProtocolError("duplicate key in JSON object")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    """Refuse NaN and Infinity, which are not JSON."""
    raise ProtocolError(f"{name} is not allowed in canonical JSON")


def parse_canonical_json(data: bytes, *, max_bytes: int = MAX_CANONICAL_BYTES) -> Any:
    """Parse ``data``, refusing it unless it is exactly canonical, so a value has one encoding."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("canonical JSON input must be bytes")
    raw = bytes(data)
    if len(raw) > max_bytes:
        raise ProtocolError(f"JSON message of {len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError("JSON message is nested too deeply") from None
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("message is not valid UTF-8 JSON") from None
    if _depth(value) > MAX_DEPTH:
        raise ProtocolError(f"JSON message is nested deeper than {MAX_DEPTH}")
    if canonical_json(value) != raw:
        raise ProtocolError("JSON message is not in canonical form")
    return value


def _depth(value: Any) -> int:
    """How many arrays and objects are nested in each other in ``value``, without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, outer = stack.pop()
        if isinstance(item, dict | list):
            depth = outer + 1
            deepest = max(deepest, depth)
            stack.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest
