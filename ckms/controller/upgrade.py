"""Work the controller does once unsealed, on data written before a format needed the root KEK.

:func:`after_unseal` runs inside every successful unseal, before anything is served:

- **Row MACs.** Rows written before rows were bound to the root KEK are stamped, once per store
  (``ckms.controller.rowmac.bind_existing``); from then on every read of them is checked.

- **Keyed digests.** Versions stored before digests were keyed carry ``sha256:`` of their
  material; each one that still has material is re-digested under the fleet's digest key (the
  material is opened and checked like any fetch), so no new event, sync or fleet view names the
  plain hash again. Destroyed versions have no material to re-digest and keep their old value,
  which is never sent to agents. Hosts refetch the re-digested versions on their next sync (the
  digest changed) and ack the keyed digest.

Each step is idempotent and audited with what it changed (counts only).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from ckms.controller import rowmac
from ckms.errors import CKMSError
from ckms.store import Store
from ckms.store import audit as audit_log

if TYPE_CHECKING:
    from ckms.controller.sealing import Vault

log = logging.getLogger(__name__)


async def after_unseal(store: Store, vault: Vault, *, now: datetime) -> None:
    """Bind rows to the root KEK (once per store), turn row checks on, then bring data written
    by older versions up to what needs the root KEK (see the module)."""
    row_key = vault.row_key()
    async with store.write() as tx:
        bound = await rowmac.bind_existing(tx, row_key, now=now)
    if bound:
        log.info("bound %d existing rows to the root KEK", bound)
    store.row_key = row_key
    store.invalidate()  # caches filled while sealed were not checked
    from ckms.controller.ca import ControllerCA  # ca imports sealing, which imports this

    await ControllerCA(store, vault).ensure(now=now)
    rekeyed, skipped = await _rekey_digests(store, vault)
    if rekeyed or skipped:
        async with store.write() as tx:
            await audit_log.append(
                tx,
                now=now,
                actor="controller",
                action="controller.upgrade",
                object="controller",
                details={"digests_rekeyed": rekeyed, "digests_not_rekeyed": skipped},
            )


async def _rekey_digests(store: Store, vault: Vault) -> tuple[int, int]:
    rows = await store.fetchall(
        "SELECT k.id, k.name, v.version, v.digest FROM key_versions v "
        "JOIN keys k ON k.id = v.key_id "
        "WHERE v.digest NOT LIKE 'hmac-sha256:%' AND v.sealed_material IS NOT NULL"
    )
    rekeyed = skipped = 0
    for row in rows:
        try:
            material = await vault.material(str(row["name"]), int(row["version"]))
        except CKMSError as exc:
            # An edited row fails to open: it keeps its old digest, so agents refuse it too.
            log.error("cannot re-digest %s v%d: %s", row["name"], row["version"], exc)
            skipped += 1
            continue
        digest = vault.digest(material)
        del material
        async with store.write() as tx:
            changed = await tx.execute(
                "UPDATE key_versions SET digest = ? WHERE key_id = ? AND version = ? "
                "AND digest = ?",
                (digest, row["id"], row["version"], row["digest"]),
            )
            if changed:
                await rowmac.stamp_version(tx, str(row["id"]), int(row["version"]))
        rekeyed += 1
    if rekeyed:
        log.info("re-digested %d key versions under the fleet digest key", rekeyed)
    return rekeyed, skipped
