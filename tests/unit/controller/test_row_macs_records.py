"""Row MACs read a PostgreSQL row (an asyncpg Record) as they read a dict or a sqlite3.Row.

A Record's ``keys()`` is a one-pass iterator, not a view: a field looked for in it consumes
the names before it. A field that is set must be covered by the MAC whatever order the
columns come in, or the database's owner could edit it unseen (or a good row fail its check).
"""

from __future__ import annotations

import pytest

from ckms.controller import rowmac
from tests.support.postgres import PostgresDatabase, connect

pytestmark = pytest.mark.postgres

ROW_KEY = bytes(range(32))


async def test_optional_fields_of_a_record_are_covered_in_any_column_order(
    postgres_database: PostgresDatabase,
) -> None:
    # The optional fields last and in the opposite order of CERTIFICATE_OPTIONAL_FIELDS.
    names = (*rowmac.CERTIFICATE_FIELDS, *reversed(rowmac.CERTIFICATE_OPTIONAL_FIELDS))
    columns = ", ".join(f"'{name}-value'::text AS {name}" for name in names)
    conn = await connect(postgres_database.url, postgres_database.password_file)
    try:
        record = await conn.fetchrow(f"SELECT 'serial-1'::text AS serial, {columns}")
    finally:
        await conn.close()
    assert record is not None
    plain = dict(record.items())
    assert rowmac.certificate_row_mac(ROW_KEY, record) == rowmac.certificate_row_mac(
        ROW_KEY, plain
    )
    # And editing the optional field the iterator would have skipped changes the MAC.
    edited = {**plain, rowmac.CERTIFICATE_OPTIONAL_FIELDS[0]: "edited"}
    assert rowmac.certificate_row_mac(ROW_KEY, edited) != rowmac.certificate_row_mac(
        ROW_KEY, record
    )
