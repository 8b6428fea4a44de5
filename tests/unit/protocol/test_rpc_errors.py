"""Refusals over the RPC keep their class and whether a retry may work."""

from __future__ import annotations

import pytest

from ckms.errors import CKMSError, NotFoundError, TransportError
from ckms.protocol._rpc import error_reply, parse_reply


class _Busy(CKMSError):
    """A server-side error class the client does not know."""

    retriable = True


def test_retriable_survives_the_wire_even_for_an_unknown_class() -> None:
    with pytest.raises(CKMSError) as caught:
        parse_reply(error_reply(_Busy("too many requests in flight")))
    assert type(caught.value) is CKMSError  # the client has no such class
    assert caught.value.retriable is True


def test_known_classes_keep_their_own_retriable() -> None:
    with pytest.raises(NotFoundError) as missing:
        parse_reply(error_reply(NotFoundError("no key a/b")))
    assert missing.value.retriable is False
    with pytest.raises(TransportError) as transport:
        parse_reply(error_reply(TransportError("gone")))
    assert transport.value.retriable is True
    assert CKMSError.retriable is False  # set on the one error, not on its class
