"""Postgres's built-in ``pgoutput`` logical decoding messages (protocol version 1), parsed.

Pure code: bytes in, values out. The SQL slot functions (``pg_logical_slot_peek_binary_changes``)
return one message per row; :class:`Assembler` turns them into whole transactions. Relation
messages precede a relation's first change in each decoding session (every SQL call is one), so
the assembler keeps the relations it has seen and is fed every call's rows in order.

Layout (Postgres docs, "Logical Replication Message Formats"): integers big-endian, strings
NUL-terminated, tuple columns tagged ``n`` (null), ``u`` (unchanged TOAST) or ``t`` (text).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field


class PgoutputError(ValueError):
    """A message this parser cannot read (a protocol it does not speak, or truncated bytes)."""


class Unchanged(enum.Enum):
    """An unchanged TOASTed value: an update that did not touch it does not resend it."""

    TOAST = "u"


Value = str | None | Unchanged
"""One column of a tuple: its text output, None for SQL NULL, or ``Unchanged.TOAST``."""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    key: bool  # part of the replica identity


@dataclass(frozen=True, slots=True)
class Relation:
    relid: int
    schema: str
    name: str
    replica_identity: str  # d (default: primary key), n (nothing), f (full), i (index)
    columns: tuple[Column, ...]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_time: int  # microseconds since 2000-01-01
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(frozen=True, slots=True)
class Insert:
    relid: int
    new: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Update:
    relid: int
    new: tuple[Value, ...]
    old: tuple[Value, ...] | None = None  # the replica identity's (K) or the whole row's (O)


@dataclass(frozen=True, slots=True)
class Delete:
    relid: int
    old: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Truncate:
    relids: tuple[int, ...]
    options: int  # 1: CASCADE, 2: RESTART IDENTITY


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message with nothing for table streams (Origin, Type)."""

    tag: str


Message = Begin | Commit | Relation | Insert | Update | Delete | Truncate | Ignored


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise PgoutputError("message ends early")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def int8(self) -> int:
        return self.take(1)[0]

    def int16(self) -> int:
        value: int = struct.unpack(">h", self.take(2))[0]
        return value

    def int32(self) -> int:
        value: int = struct.unpack(">i", self.take(4))[0]
        return value

    def uint32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def int64(self) -> int:
        value: int = struct.unpack(">q", self.take(8))[0]
        return value

    def uint64(self) -> int:
        value: int = struct.unpack(">Q", self.take(8))[0]
        return value

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise PgoutputError("string without its terminator")
        text = self.data[self.pos : end].decode("utf-8")
        self.pos = end + 1
        return text

    def tuple(self) -> tuple[Value, ...]:
        count = self.int16()
        values: list[Value] = []
        for _ in range(count):
            kind = self.take(1)
            if kind == b"n":
                values.append(None)
            elif kind == b"u":
                values.append(Unchanged.TOAST)
            elif kind == b"t":
                values.append(self.take(self.int32()).decode("utf-8"))
            else:  # b (binary) only comes with the binary option, which Relay never asks for
                raise PgoutputError(f"unknown tuple column kind {kind!r}")
        return tuple(values)


def decode(data: bytes) -> Message:
    """One pgoutput message. Raises PgoutputError for malformed or unknown ones."""
    if not data:
        raise PgoutputError("empty message")
    reader = _Reader(data)
    tag = chr(reader.int8())
    if tag == "B":
        return Begin(reader.uint64(), reader.int64(), reader.uint32())
    if tag == "C":
        reader.int8()  # flags, unused
        return Commit(reader.uint64(), reader.uint64(), reader.int64())
    if tag == "R":
        relid, schema, name = reader.uint32(), reader.string(), reader.string()
        identity = chr(reader.int8())
        columns = []
        for _ in range(reader.int16()):
            flags = reader.int8()
            column_name = reader.string()
            type_oid = reader.uint32()
            reader.int32()  # typmod
            columns.append(Column(column_name, type_oid, bool(flags & 1)))
        return Relation(relid, schema, name, identity, tuple(columns))
    if tag == "I":
        relid = reader.uint32()
        if reader.take(1) != b"N":
            raise PgoutputError("insert without a new tuple")
        return Insert(relid, reader.tuple())
    if tag == "U":
        relid = reader.uint32()
        kind = reader.take(1)
        old = None
        if kind in (b"K", b"O"):
            old = reader.tuple()
            kind = reader.take(1)
        if kind != b"N":
            raise PgoutputError("update without a new tuple")
        return Update(relid, reader.tuple(), old)
    if tag == "D":
        relid = reader.uint32()
        if reader.take(1) not in (b"K", b"O"):
            raise PgoutputError("delete without an old tuple")
        return Delete(relid, reader.tuple())
    if tag == "T":
        count = reader.int32()
        options = reader.int8()
        return Truncate(tuple(reader.uint32() for _ in range(count)), options)
    if tag in ("O", "Y"):
        return Ignored(tag)
    raise PgoutputError(f"unknown message type {tag!r}")


RowChange = Insert | Update | Delete | Truncate


@dataclass(frozen=True, slots=True)
class Transaction:
    """One committed transaction's changes, in the order they were made."""

    xid: int
    commit_lsn: int
    end_lsn: int  # where the slot may be advanced to once this is applied
    changes: tuple[tuple[Relation, RowChange], ...]
    """Each change with its relation as it was then (a Truncate once per relation it names)."""


@dataclass
class Assembler:
    """Feeds on one decoding session's messages in order; hands back whole transactions."""

    relations: dict[int, Relation] = field(default_factory=dict)
    _begin: Begin | None = None
    _changes: list[tuple[Relation, RowChange]] = field(default_factory=list)

    def feed(self, data: bytes) -> Transaction | None:
        """The transaction this message completes (a Commit), else None."""
        message = decode(data)
        if isinstance(message, Relation):
            self.relations[message.relid] = message
        elif isinstance(message, Begin):
            self._begin = message
            self._changes = []
        elif isinstance(message, Commit):
            if self._begin is None:
                raise PgoutputError("commit without begin")
            txn = Transaction(
                self._begin.xid,
                message.commit_lsn,
                message.end_lsn,
                tuple(self._changes),
            )
            self._begin = None
            return txn
        elif isinstance(message, Truncate):
            self._changes.extend((self._relation(relid), message) for relid in message.relids)
        elif isinstance(message, Insert | Update | Delete):
            self._changes.append((self._relation(message.relid), message))
        return None

    def _relation(self, relid: int) -> Relation:
        if self._begin is None:
            raise PgoutputError("change outside a transaction")
        relation = self.relations.get(relid)
        if relation is None:
            raise PgoutputError(f"change to relation {relid} before its Relation message")
        return relation
