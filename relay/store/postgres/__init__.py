"""The Postgres store, in rooms: ``store`` (the Store: lifecycle, reads, the batch
transaction, LISTEN), ``plan`` (the batch planner, pure), ``known`` (what a relay knows
without asking), ``statements`` (the named SQL), ``compaction``, ``schema`` (migrations and
the CLI commands on them) and ``connections`` (what a lost database looks like)."""

from relay.store.postgres.compaction import COMPACT_BYTES, CompactionPass
from relay.store.postgres.schema import apply_migrations, migrate, revoke
from relay.store.postgres.store import PostgresStore

__all__ = [
    "COMPACT_BYTES",
    "CompactionPass",
    "PostgresStore",
    "apply_migrations",
    "migrate",
    "revoke",
]
