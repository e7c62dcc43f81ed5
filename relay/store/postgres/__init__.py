"""The Postgres store, in rooms: ``store`` (the thin ``PostgresStore`` composing the rest),
``transaction`` (how a batch runs: the engine's plans answered with the named SQL of
``sql/postgres/queries.sql``), ``guarded`` (the one-round-trip write and the divergence
check), ``listen`` (LISTEN and its barrier), ``known`` (what a relay knows without asking),
``notify`` (the commit payload), ``database`` (pool and committer connections), ``replicas``,
``compaction``, ``schema`` (migrations and the CLI commands on them) and ``connections`` (what
a lost database looks like)."""

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
