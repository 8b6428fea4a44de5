"""The one pager behind every paged read (``key.list``, ``host.list``): it follows ``next`` to
the last page and refuses a controller whose cursor does not advance instead of looping."""

from __future__ import annotations

from typing import Any

import pytest

from ckms.errors import ProtocolError
from ckms.protocol import admin as api


def _host(name: str) -> dict[str, Any]:
    return {"id": name, "labels": {}, "enrolled_at": None, "revoked": False}


class _Fleet:
    def __init__(self, names: list[str], *, stuck: bool = False) -> None:
        self.names = names
        self.stuck = stuck
        self.asked: list[str | None] = []

    async def call(self, method: str, params: Any, reply: type[Any]) -> Any:
        assert method == "host.list" and isinstance(params, api.HostListParams)
        self.asked.append(params.after)
        rest = [n for n in self.names if params.after is None or n > params.after]
        page, more = rest[: params.limit], len(rest) > params.limit
        cursor = (params.after or page[-1]) if self.stuck else page[-1]
        return reply.model_validate(
            {"hosts": [_host(n) for n in page], "next": cursor if more else None}
        )


async def test_every_page_once_in_order() -> None:
    fleet = _Fleet([f"h{i:02}" for i in range(7)])
    seen = [h.id async for page in api.host_pages(fleet.call, limit=3) for h in page.hosts]
    assert seen == fleet.names
    assert fleet.asked == [None, "h02", "h05"]


async def test_a_cursor_that_does_not_advance_is_refused() -> None:
    fleet = _Fleet([f"h{i:02}" for i in range(7)], stuck=True)
    with pytest.raises(ProtocolError, match=r"host\.list cursor did not advance"):
        async for _ in api.host_pages(fleet.call, limit=3):
            pass


async def test_the_next_page_is_asked_for_while_this_one_is_shown() -> None:
    """The controller reads page n+1 while the caller shows page n; a caller that stops early
    leaves no request behind."""
    fleet = _Fleet([f"h{i:02}" for i in range(7)])
    pages = api.host_pages(fleet.call, limit=3)
    first = await anext(pages)
    assert [h.id for h in first.hosts] == ["h00", "h01", "h02"]
    assert fleet.asked == [None, "h02"]  # asked before the first page was even looked at
    await anext(pages)
    assert fleet.asked == [None, "h02", "h05"]
    await pages.aclose()  # stopping here: the request for nothing more is cancelled, not left
    assert fleet.asked == [None, "h02", "h05"]
