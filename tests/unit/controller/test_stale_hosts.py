"""A host is stale when not seen for longer than the shortest max staleness of the keys that
target it (a day when none does), decided per distinct targets, not per key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ckms.controller.fleet import FleetView
from ckms.controller.lifecycle import Lifecycle, NewKey
from ckms.controller.models import Host, Targets
from ckms.controller.policy import default_policy
from ckms.crypto import KeyType
from ckms.store import Store

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _host(name: str, role: str) -> Host:
    return Host(id=name, name=name, labels={"role": role})


async def test_the_shortest_staleness_of_the_keys_targeting_a_host_applies(
    lifecycle: Lifecycle, store: Store
) -> None:
    web = Targets(selectors=({"role": "web"},))
    base = default_policy(KeyType.AES_256)
    await lifecycle.create_many(
        [
            NewKey(name=f"team/k{i}", type="aes-256", targets=web, policy=base)
            for i in range(50)
        ]
        + [
            NewKey(
                name="team/a-strict",
                type="aes-256",
                targets=web,
                policy=base.model_copy(update={"max_staleness": timedelta(minutes=20)}),
            )
        ],
        actor="alice",
    )
    keys = list((await lifecycle.current_keys()).values())
    assert len({id(k.targets) for k in keys}) == 1  # one parsed targets for all 51 keys
    hosts = [_host("a", "web"), _host("b", "db"), _host("c", "web")]
    facts = {
        "a": {"last_seen_at": NOW - timedelta(minutes=30)},  # over the strict key's 20 min
        "b": {"last_seen_at": NOW - timedelta(hours=5)},  # no key: a day
        "c": {"last_seen_at": NOW - timedelta(minutes=10)},
    }
    fleet = FleetView(store, lifecycle, None)  # type: ignore[arg-type]
    assert await fleet.stale_hosts(keys, hosts, NOW, facts) == ["a"]
    assert await fleet.stale_hosts(keys[1:], hosts, NOW, facts) == []  # without the strict one
