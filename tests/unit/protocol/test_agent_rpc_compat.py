"""Agent RPC models: fields added later are left out when empty, so either side may be older."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ckms.protocol import FetchRequest, InstalledVersion, SyncReply, SyncRequest

D = "sha256:" + "1" * 64


class _Old(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OldSyncRequest(_Old):
    """The request as controllers before prefetching parse it."""

    installed: tuple[InstalledVersion, ...] = ()


class OldSyncReply(_Old):
    """The reply as agents before prefetching parse it."""

    host: str
    keys: tuple[object, ...]
    remove: tuple[object, ...] = ()
    controller_time: str
    reconcile_interval_s: int = 300


def test_a_request_without_prefetch_is_what_an_older_controller_takes() -> None:
    request = SyncRequest(installed=(InstalledVersion(key="a/b", version=1, digest=D),))
    OldSyncRequest.model_validate(request.model_dump(mode="json"))
    asked = SyncRequest(fetch=(FetchRequest(key="a/b", version=2),)).model_dump(mode="json")
    assert asked["fetch"] == [{"key": "a/b", "version": 2}]
    assert SyncRequest.model_validate(asked).fetch == (FetchRequest(key="a/b", version=2),)


def test_a_reply_without_material_is_what_an_older_agent_takes() -> None:
    reply = SyncReply(host="web-1", keys=(), controller_time="2026-01-01T00:00:00.000000Z")
    OldSyncReply.model_validate(reply.model_dump(mode="json"))
