"""Real events from a controller, read raw from Kafka, validate against docs/schemas/ with an
independent validator (python-jsonschema), and verify with the Python rules."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import jsonschema
import pytest

from ckms.controller.models import Policy
from ckms.controller.service import Controller
from ckms.crypto import SubjectRole
from ckms.protocol import (
    EventType,
    InstallSpec,
    RevocationReason,
    Targets,
    trust_keys,
    verify_message,
)
from tests.support.cli import enroll_host
from tests.support.kafka import link_as
from tests.support.records import read_raw

pytestmark = pytest.mark.kafka

SCHEMAS = Path(__file__).resolve().parents[3] / "docs" / "schemas"


async def test_every_event_type_a_controller_sends_matches_its_schema(
    controller: Controller,
) -> None:
    lc = controller.lifecycle
    await enroll_host(controller, "db-7", {"env": "prod", "role": "db"})
    await lc.create(
        "payments/db",
        "aes-256",
        actor="alice",
        targets=Targets(selectors=({"env": "prod", "role": "db"},), env="prod"),
        install=InstallSpec(  # a hook name, and a command in the legacy form
            path="/etc/ckms/{team}/{purpose}.key", reload="reload-postgresql", health=["pg_isready"]
        ),
        policy=Policy(cryptoperiod=timedelta(days=90), grace=timedelta(days=7),
                      approvals_required=frozenset()),
    )  # fmt: skip
    await lc.rotate("payments/db", actor="alice")
    await lc.deactivate("payments/db", 1, actor="alice")
    await lc.revoke("payments/db", RevocationReason.KEY_COMPROMISE, version=1, actor="alice")
    await lc.destroy("payments/db", 1, actor="alice")
    await lc.set_targets(
        "payments/db",
        Targets(hosts=("db-7",), env="prod"),
        install=InstallSpec(path="/etc/ckms/{name}.json", format="keyring-json"),
        actor="alice",
    )
    await lc.set_policy(
        "payments/db",
        Policy(cryptoperiod=timedelta(days=30), grace=timedelta(days=1),
               approvals_required=frozenset()),
        actor="alice",
    )  # fmt: skip
    await controller.hosts.revoke("db-7", actor="alice")

    settings = controller.settings
    reader = link_as(controller, SubjectRole.SUBSCRIBER, "schema-check")
    records = await read_raw(reader, settings.events_topic, 8)
    envelope = jsonschema.Draft202012Validator(
        json.loads((SCHEMAS / "envelope.json").read_text(encoding="utf-8"))
    )
    trust = trust_keys([await controller.vault.public_key()])
    seen = set()
    for record in records:
        value = json.loads(record.value)
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in envelope.iter_errors(value)]
        assert not errors, (value["type"], errors)
        standalone = json.loads((SCHEMAS / f"{value['type']}.json").read_text(encoding="utf-8"))
        jsonschema.validate(value["data"], standalone, cls=jsonschema.Draft202012Validator)
        event = verify_message(record.value, record.headers, trust)
        seen.add(event.type)
    assert seen == {
        EventType.KEY_CREATED,
        EventType.KEY_ROTATED,
        EventType.KEY_STATE_CHANGED,
        EventType.KEY_REVOKED,
        EventType.KEY_DESTROYED,
        EventType.KEY_TARGETS_CHANGED,
        EventType.KEY_POLICY_CHANGED,
        EventType.HOST_REVOKED,
    }
