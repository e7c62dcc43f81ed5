"""What a committed transaction (or a snapshot) appends to which stream: pure, no I/O.

Exactly once rests on ``Stream-Seq``: each transaction's messages for one stream go out as one
append whose sequence is the transaction's commit LSN in fixed-width hex, so the store refuses a
replay (an append not greater than the last) and the follower counts it as already applied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from relay.tables.pgoutput import (
    Column,
    Delete,
    Insert,
    Relation,
    Transaction,
    Truncate,
    Unchanged,
    Update,
    Value,
)
from relay.tables.spec import TableStream, fill_path
from relay.tables.values import to_json

Message = dict[str, Any]


def commit_seq(lsn: int) -> str:
    """A transaction's ``Stream-Seq``: bytewise order is LSN order (fixed width, upper hex)."""
    return f"{lsn:016X}"


def snapshot_seq(after_lsn: int, round_: int) -> str:
    """A snapshot's ``Stream-Seq``: above every transaction applied so far (at or before
    ``after_lsn``: equal hex then a suffix sorts greater), below every one after it (a greater
    LSN differs within the hex), and above an earlier round's at the same LSN."""
    return f"{after_lsn:016X}S{round_:08d}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A ``pg_current_snapshot()`` (64-bit ``xmin:xmax:xip,...``): which transactions the
    snapshot's rows already contain."""

    xmin: int
    xmax: int
    xip: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def render(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(str(x) for x in sorted(self.xip))}"

    def visible(self, xid: int) -> bool:
        """Whether 32-bit ``xid`` (as pgoutput gives it) committed before the snapshot. It is
        widened to the 64-bit xid nearest ``xmax``: a decoded transaction is never 2^31 away."""
        full = (self.xmax & ~0xFFFFFFFF) | xid
        if full > self.xmax + (1 << 31):
            full -= 1 << 32
        elif full < self.xmax - (1 << 31):
            full += 1 << 32
        if full < self.xmin:
            return True
        return full < self.xmax and full not in self.xip


@dataclass(frozen=True, slots=True)
class Problem:
    """A change (or part of one) Relay could not publish as asked; logged and counted.

    ``reason``: path (null or invalid path column: change skipped), key (no key: skipped),
    value (a value JSON cannot carry: skipped), truncate (nothing is sent), column (a named
    column the table no longer has: sent without it), toast (an unchanged large value the
    update did not resend: sent without it)."""

    reason: str
    stream: str  # the table stream's name
    detail: str


@dataclass
class Plan:
    appends: dict[str, list[Message]] = field(default_factory=dict)  # path -> messages, in order
    problems: list[Problem] = field(default_factory=list)

    def add(self, path: str, message: Message) -> None:
        self.appends.setdefault(path, []).append(message)


def plan_transaction(
    txn: Transaction,
    streams: Mapping[str, Sequence[TableStream]],
    snapshots: Mapping[str, Snapshot],
    max_path_length: int,
) -> Plan:
    """The messages ``txn`` appends, grouped by stream path in commit order.

    ``streams`` maps a schema-qualified table to its table streams; ``snapshots`` holds each
    live table stream's starting snapshot (by name): a stream without one has not started and
    gets nothing, and a transaction the snapshot already contains is skipped for that stream.
    """
    plan = Plan()
    txid = str(txn.xid)
    for relation, change in txn.changes:
        for spec in streams.get(relation.qualified, ()):
            snapshot = snapshots.get(spec.name)
            if snapshot is None or snapshot.visible(txn.xid):
                continue
            if isinstance(change, Truncate):
                plan.problems.append(Problem("truncate", spec.name, relation.qualified))
                continue
            _plan_change(plan, spec, relation, change, txid, max_path_length)
    return plan


def _plan_change(
    plan: Plan,
    spec: TableStream,
    relation: Relation,
    change: Insert | Update | Delete,
    txid: str,
    max_path_length: int,
) -> None:
    row = _row(relation, change.old if isinstance(change, Delete) else change.new)
    old = _row(relation, change.old) if not isinstance(change, Insert | Delete) else None
    if old is not None:
        for name, value in list(row.items()):
            if value is Unchanged.TOAST and old.get(name) not in (None, Unchanged.TOAST):
                row[name] = old[name]
    entity = _Entity(plan, spec, relation, txid, max_path_length)
    if isinstance(change, Insert):
        entity.emit("insert", row)
    elif isinstance(change, Delete):
        entity.emit("delete", row, identity_only=relation.replica_identity != "f")
    elif old is not None and (
        entity.key(old, quiet=True) not in (None, entity.key(row, quiet=True))
        or entity.path(old, quiet=True) not in (None, entity.path(row, quiet=True))
    ):
        # The key or the path changed: the entity leaves its old place and appears anew.
        entity.emit("delete", old, identity_only=relation.replica_identity != "f")
        entity.emit("insert", row)
    else:
        entity.emit("update", row)


def _row(relation: Relation, values: tuple[Value, ...] | None) -> dict[str, Value]:
    if values is None:
        return {}
    return {column.name: value for column, value in zip(relation.columns, values, strict=False)}


@dataclass
class _Entity:
    plan: Plan
    spec: TableStream
    relation: Relation
    txid: str
    max_path_length: int

    def key(self, row: Mapping[str, Value], *, quiet: bool = False) -> str | None:
        names = self.spec.key or tuple(c.name for c in self.relation.columns if c.key)
        values = [row.get(name) for name in names]
        if not names or any(not isinstance(v, str) for v in values):
            if not quiet:
                detail = "no key columns" if not names else f"null key in {','.join(names)}"
                self.plan.problems.append(Problem("key", self.spec.name, detail))
            return None
        return "/".join(v for v in values if isinstance(v, str))

    def path(self, row: Mapping[str, Value], *, quiet: bool = False) -> str | None:
        texts = {k: v for k, v in row.items() if isinstance(v, str)}
        path = fill_path(self.spec.path, texts, self.max_path_length)
        if path is None and not quiet:
            shown = {c: row.get(c) for c in self.spec.path_columns}
            self.plan.problems.append(Problem("path", self.spec.name, f"path columns {shown}"))
        return path

    def emit(
        self, operation: str, row: Mapping[str, Value], *, identity_only: bool = False
    ) -> None:
        if identity_only:
            hidden = [c for c in self.spec.path_columns if not self._is_key(c)]
            if hidden:
                detail = (
                    f"delete: path column {hidden[0]} is not in {self.relation.qualified}'s "
                    "replica identity (ALTER TABLE ... REPLICA IDENTITY FULL)"
                )
                self.plan.problems.append(Problem("path", self.spec.name, detail))
                return
        key, path = self.key(row), self.path(row)
        if key is None or path is None:
            return
        try:
            value = self._value(row, identity_only)
        except ValueError as exc:
            self.plan.problems.append(Problem("value", self.spec.name, str(exc)))
            return
        self.plan.add(path, message(self.spec.type, key, value, operation, self.txid))

    def _is_key(self, name: str) -> bool:
        return any(c.name == name and c.key for c in self.relation.columns)

    def _value(self, row: Mapping[str, Value], identity_only: bool) -> dict[str, Any]:
        types = {c.name: c.type_oid for c in self.relation.columns}
        value: dict[str, Any] = {}
        for name in self.spec.columns:
            if name not in types:
                self.plan.problems.append(Problem("column", self.spec.name, f"no column {name}"))
                continue
            if identity_only and not self._is_key(name):
                continue
            text = row.get(name)
            if text is Unchanged.TOAST:
                self.plan.problems.append(Problem("toast", self.spec.name, f"{name} not resent"))
                continue
            value[name] = to_json(types[name], text)
        return value


def message(entity: str, key: str, value: Mapping[str, Any], operation: str, txid: str) -> Message:
    """One State Protocol change message."""
    return {
        "type": entity,
        "key": key,
        "value": dict(value),
        "headers": {"operation": operation, "txid": txid},
    }


def control(kind: str) -> Message:
    """A State Protocol control message: snapshot-start, snapshot-end or reset."""
    return {"headers": {"control": kind}}


def plan_snapshot(
    spec: TableStream,
    types: Mapping[str, int],
    key: Sequence[str],
    rows: Sequence[tuple[str | None, Mapping[str, str | None]]],
    max_path_length: int,
    plan: Plan,
) -> None:
    """Add ``spec``'s current rows (``(xmin, row)`` pairs, values as text) to ``plan`` as
    inserts; the caller brackets each path's messages with snapshot-start and snapshot-end."""
    columns = tuple(Column(name, oid, name in key) for name, oid in types.items())
    relation = Relation(0, spec.schema_name, spec.table_name, "d", columns)
    for xmin, row in rows:
        entity = _Entity(plan, spec, relation, xmin or "", max_path_length)
        entity.emit("insert", dict(row))
