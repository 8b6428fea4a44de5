"""`ckms seal` among replicas: each replica keeps its own seal, so sealing the ones named
must not leave another one unsealed without a word (an emergency seal that missed a
replica leaves the KEK in its memory and the replica serving). Two real replicas on one store,
the real CLI; no Kafka."""

from __future__ import annotations

from pathlib import Path

from ckms.cli._errors import ExitCode
from ckms.store import lease as leases
from tests.support.cli import Operators, run_cli
from tests.support.controller import running_replicas
from tests.support.waiting import wait_until


async def test_sealing_some_replicas_names_the_ones_left_unsealed(tmp_path: Path) -> None:
    async with running_replicas(tmp_path) as (a, b):
        people = Operators(a, tmp_path)
        await people.add("alice", "admin")
        assert a.store is not None

        async def both_beat_unsealed() -> bool:
            rows = await leases.read_replicas(a.store)  # type: ignore[arg-type]
            return len(rows) == 2 and not any(r.sealed for r in rows)

        await wait_until(both_beat_unsealed, 30, "both replicas' heartbeats")
        env = people.env("alice")
        env["CKMS_CONTROLLER"] = f"127.0.0.1:{a.port}"
        one = await run_cli("seal", env=env)
        assert a.vault.sealed and not b.vault.sealed
        assert one.rc == ExitCode.FAILED, one
        assert b.leader.name in one.stderr and "unsealed" in one.stderr
        assert a.leader.name not in one.stderr

        env["CKMS_CONTROLLER"] = f"127.0.0.1:{a.port},127.0.0.1:{b.port}"
        both = await run_cli("seal", env=env)
        assert both.rc == ExitCode.OK, both
        assert b.vault.sealed
