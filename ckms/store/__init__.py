"""ckms.store: the controller's SQLite store (aiosqlite, WAL, one writer), audit log and outbox.

``Store.open(path)`` applies migrations and returns the store; ``async with store.write() as tx``
is the one way to change it. :mod:`ckms.store.audit` holds the hash-chained audit log and
:mod:`ckms.store.outbox` the transactional outbox; :class:`GroupWriter` commits small writes of
concurrent requests together.
"""

from ckms.store._group import GroupWriter
from ckms.store._ids import new_id
from ckms.store._migrations import MIGRATIONS, Migration
from ckms.store._store import Reader, Store, Transaction, apply_migrations, read_only_uri
from ckms.store._time import Clock, format_time, parse_time, require_utc, utc_now
from ckms.store._url import StoreURL, parse_store_url

__all__ = [
    "MIGRATIONS",
    "Clock",
    "GroupWriter",
    "Migration",
    "Reader",
    "Store",
    "StoreURL",
    "Transaction",
    "apply_migrations",
    "format_time",
    "new_id",
    "parse_store_url",
    "parse_time",
    "read_only_uri",
    "require_utc",
    "utc_now",
]
