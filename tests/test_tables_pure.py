"""Table streams' pure parts, one row per rule: pgoutput messages, definitions, paths, value
encodings, snapshot visibility, Stream-Seq order, and what a transaction appends where."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from relay.tables.pgoutput import (
    Assembler,
    Begin,
    Column,
    Commit,
    Delete,
    Ignored,
    Insert,
    PgoutputError,
    Relation,
    Transaction,
    Truncate,
    Unchanged,
    Update,
    Value,
    decode,
)
from relay.tables.plan import Snapshot, commit_seq, plan_transaction, snapshot_seq
from relay.tables.spec import TableStream, fill_path, parse, parse_many
from relay.tables.values import to_json

# -- building pgoutput bytes ------------------------------------------------------------------


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def _tuple(values: list[Value]) -> bytes:
    out = struct.pack(">h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v is Unchanged.TOAST:
            out += b"u"
        else:
            assert isinstance(v, str)
            out += b"t" + struct.pack(">i", len(v.encode())) + v.encode()
    return out


def relation_bytes(relid: int, columns: list[tuple[str, int, bool]], identity: str = "d") -> bytes:
    out = b"R" + struct.pack(">I", relid) + _s("public") + _s("t") + identity.encode()
    out += struct.pack(">h", len(columns))
    for name, oid, key in columns:
        out += bytes([1 if key else 0]) + _s(name) + struct.pack(">Ii", oid, -1)
    return out


BEGIN = b"B" + struct.pack(">QqI", 0x16_0000_0100, 789, 4242)
COMMIT = b"C\0" + struct.pack(">QQq", 0x16_0000_0100, 0x16_0000_0130, 789)
COLUMNS = [("id", 23, True), ("chat", 25, False), ("body", 25, False)]
RELATION = Relation(
    16384,
    "public",
    "t",
    "d",
    (Column("id", 23, True), Column("chat", 25, False), Column("body", 25, False)),
)

DECODED: list[tuple[str, bytes, object]] = [
    ("begin", BEGIN, Begin(0x16_0000_0100, 789, 4242)),
    ("commit", COMMIT, Commit(0x16_0000_0100, 0x16_0000_0130, 789)),
    ("relation", relation_bytes(16384, COLUMNS), RELATION),
    (
        "insert",
        b"I" + struct.pack(">I", 16384) + b"N" + _tuple(["1", "c", None]),
        Insert(16384, ("1", "c", None)),
    ),
    (
        "update, new tuple only",
        b"U" + struct.pack(">I", 1) + b"N" + _tuple(["1", Unchanged.TOAST]),
        Update(1, ("1", Unchanged.TOAST)),
    ),
    (
        "update with the old key",
        b"U" + struct.pack(">I", 1) + b"K" + _tuple(["1"]) + b"N" + _tuple(["2"]),
        Update(1, ("2",), ("1",)),
    ),
    (
        "update with the old row",
        b"U" + struct.pack(">I", 1) + b"O" + _tuple(["1", "a"]) + b"N" + _tuple(["1", "b"]),
        Update(1, ("1", "b"), ("1", "a")),
    ),
    ("delete", b"D" + struct.pack(">I", 1) + b"K" + _tuple(["1"]), Delete(1, ("1",))),
    ("truncate", b"T" + struct.pack(">iB", 2, 1) + struct.pack(">II", 5, 6), Truncate((5, 6), 1)),
    ("origin", b"O" + struct.pack(">Q", 1) + _s("x"), Ignored("O")),
    ("non-ASCII text", b"I" + struct.pack(">I", 1) + b"N" + _tuple(["é✓"]), Insert(1, ("é✓",))),
]


@pytest.mark.parametrize(("case", "data", "expected"), DECODED, ids=[c[0] for c in DECODED])
def test_pgoutput_messages_decode(case: str, data: bytes, expected: object) -> None:
    assert decode(data) == expected


MALFORMED = [
    ("empty", b""),
    ("unknown type", b"Z"),
    ("truncated begin", BEGIN[:-1]),
    ("insert without N", b"I" + struct.pack(">I", 1) + b"K" + _tuple(["1"])),
    ("binary column", b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"b"),
    ("unterminated string", b"R" + struct.pack(">I", 1) + b"public"),
]


@pytest.mark.parametrize(("case", "data"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_pgoutput_messages_raise(case: str, data: bytes) -> None:
    with pytest.raises(PgoutputError):
        decode(data)


def test_the_assembler_hands_back_whole_transactions_with_their_relations() -> None:
    assembler = Assembler()
    insert = b"I" + struct.pack(">I", 16384) + b"N" + _tuple(["1", "c", "hi"])
    assert assembler.feed(relation_bytes(16384, COLUMNS)) is None
    assert assembler.feed(BEGIN) is None
    assert assembler.feed(insert) is None
    txn = assembler.feed(COMMIT)
    assert txn == Transaction(
        4242, 0x16_0000_0100, 0x16_0000_0130, ((RELATION, Insert(16384, ("1", "c", "hi"))),)
    )
    with pytest.raises(PgoutputError, match="before its Relation"):
        assembler.feed(BEGIN)
        assembler.feed(b"I" + struct.pack(">I", 99) + b"N" + _tuple(["1"]))
    with pytest.raises(PgoutputError, match="commit without begin"):
        Assembler().feed(COMMIT)


# -- definitions and paths ----------------------------------------------------------------------

PARSED: list[tuple[str, TableStream]] = [
    (
        "chats:chat/{id}/state:type=chat:key=id:columns=id,title,updated_at",
        TableStream(
            "public.chats", "chat/{id}/state", ("id", "title", "updated_at"), "chat", ("id",)
        ),
    ),
    (
        "app.messages:chat/{chat_id}/state:columns=id,chat_id",
        TableStream("app.messages", "chat/{chat_id}/state", ("id", "chat_id"), "messages"),
    ),
    ("t:/lead/and/trail/:columns=a", TableStream("public.t", "lead/and/trail", ("a",), "t")),
]


@pytest.mark.parametrize(("text", "expected"), PARSED)
def test_definitions_parse_and_render_back(text: str, expected: TableStream) -> None:
    assert parse(text) == expected
    assert parse(expected.render()) == expected


REFUSED = [
    ("chats", "expected TABLE:PATH"),
    ("chats:chat/{id}", "columns= is required"),
    ("chats:chat/{id}:columns=title", "path column {id} must be one of columns="),
    ("chats:chat/{id}:columns=id:key=title", "key column 'title' must be one of columns="),
    ("chats:chat/{id:columns=id", "unbalanced brace"),
    ("chats:__ds/{id}:columns=id", "not a valid stream path"),
    ("chats:a/../{id}:columns=id", "not a valid stream path"),
    ("chats:a/{id}:columns=id,id", "names a column twice"),
    ("chats:a/{id}:columns=id:colour=red", "options are type=, key= and columns="),
    ("1chats:a/{id}:columns=id", "is not a table name"),
    ("chats:a/{id}:columns=id;drop", "is not a column name"),
]


@pytest.mark.parametrize(("text", "message"), REFUSED)
def test_bad_definitions_are_refused_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        parse(text)


def test_comma_joined_definitions_split_between_definitions_not_columns() -> None:
    joined = "chats:c/{id}:columns=id,title:type=chat,messages:c/{chat_id}/m:columns=id,chat_id"
    assert [s.name for s in parse_many(joined)] == [
        "public.chats:c/{id}",
        "public.messages:c/{chat_id}/m",
    ]
    with pytest.raises(ValueError, match="declared twice"):
        parse_many("t:a/{x}:columns=x,t:a/{x}:columns=x")


PATHS: list[tuple[str, dict[str, Any], str | None]] = [
    ("chat/{id}/state", {"id": "42"}, "chat/42/state"),
    ("chat/{a}/{b}", {"a": "x", "b": "y"}, "chat/x/y"),
    ("chat/{id}/state", {"id": None}, None),  # null
    ("chat/{id}/state", {"id": ""}, None),  # empty segment
    ("chat/{id}/state", {"id": "a/b"}, None),  # would change the path's shape
    ("chat/{id}/state", {"id": ".."}, None),
    ("chat/{id}/state", {"id": "a\nb"}, None),
    ("chat/{id}/state", {}, None),  # not in the row
    ("chat/{id}", {"id": "x" * 20}, None),  # longer than the limit (24 bytes)
    ("fixed/path", {}, "fixed/path"),
]


@pytest.mark.parametrize(("template", "row", "expected"), PATHS)
def test_paths_are_filled_from_the_row_or_refused(
    template: str, row: dict[str, Any], expected: str | None
) -> None:
    assert fill_path(template, row, 24) == expected


# -- values -------------------------------------------------------------------------------------

VALUES: list[tuple[int, str | None, Any]] = [
    (23, "42", 42),
    (20, "9223372036854775807", 9223372036854775807),
    (16, "t", True),
    (16, "false", False),  # the cast a snapshot's ::text uses
    (701, "1.5", 1.5),
    (701, "NaN", "NaN"),
    (701, "-Infinity", "-Infinity"),
    (1700, "12345678901234567890.000001", "12345678901234567890.000001"),
    (3802, '{"a": [1, null]}', {"a": [1, None]}),
    (114, "[1,2]", [1, 2]),
    (17, "\\x0102ff", "AQL/"),
    (1184, "2024-05-01 12:00:00.25+00", "2024-05-01T12:00:00.25Z"),
    (1184, "2024-05-01 12:00:00+05:30", "2024-05-01T12:00:00+05:30"),
    (1184, "2024-05-01 12:00:00-07", "2024-05-01T12:00:00-07:00"),
    (1184, "infinity", "infinity"),
    (1114, "2024-05-01 12:00:00", "2024-05-01T12:00:00"),
    (1082, "2024-05-01", "2024-05-01"),
    (2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    (1009, '{a,"b c"}', '{a,"b c"}'),
    (25, None, None),
]


@pytest.mark.parametrize(("oid", "text", "expected"), VALUES)
def test_column_values_become_exact_json(oid: int, text: str | None, expected: Any) -> None:
    assert to_json(oid, text) == expected


# -- snapshots and sequences --------------------------------------------------------------------

EPOCH = 3 << 32
VISIBILITY: list[tuple[str, int, bool]] = [
    ("100:105:102", 99, True),  # before xmin
    ("100:105:102", 101, True),  # between, finished
    ("100:105:102", 102, False),  # in progress at the snapshot
    ("100:105:102", 105, False),  # at xmax: started after
    ("100:105:102", 200, False),
    # Across the 32-bit wrap: xmax's epoch decides, both ways.
    (f"{EPOCH + 10}:{EPOCH + 20}:", 0xFFFFFFF0, True),  # the previous epoch, long finished
    (f"{EPOCH - 10}:{EPOCH + 5}:", 3, True),
    (f"{EPOCH - 10}:{EPOCH - 5}:", 2, False),  # the next epoch: after the snapshot
]


@pytest.mark.parametrize(("snapshot", "xid", "visible"), VISIBILITY)
def test_snapshot_visibility_of_a_32_bit_xid(snapshot: str, xid: int, visible: bool) -> None:
    parsed = Snapshot.parse(snapshot)
    assert parsed.visible(xid) is visible
    assert Snapshot.parse(parsed.render()) == parsed


def test_stream_seq_orders_as_lsns_do_with_snapshots_between() -> None:
    order = [
        commit_seq(0x9),
        commit_seq(0xA),
        snapshot_seq(0xA, 1),
        snapshot_seq(0xA, 2),
        commit_seq(0xB),
        commit_seq(0x1_0000_0000),
        commit_seq(0xFFFF_FFFF_FFFF_FFFF),
    ]
    assert [s.encode() for s in order] == sorted(s.encode() for s in order)


# -- planning -----------------------------------------------------------------------------------

SPEC = TableStream("public.t", "c/{chat}", ("id", "chat", "body"), "row", ("id",))
LIVE = {SPEC.name: Snapshot(100, 100)}
FULL = Relation(
    1, "public", "t", "f", tuple(Column(c.name, c.type_oid, True) for c in RELATION.columns)
)


def txn(*changes: Any, xid: int = 200, relation: Relation = FULL) -> Transaction:
    return Transaction(xid, 0x10, 0x20, tuple((relation, c) for c in changes))


def ops(plan_appends: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str, Any]]:
    return [
        (path, m["headers"]["operation"], m["key"], m["value"])
        for path, messages in plan_appends.items()
        for m in messages
    ]


PLANS: list[tuple[str, Transaction, list[tuple[str, str, str, Any]], list[str]]] = [
    (
        "insert, update, delete on one path, in order",
        txn(
            Insert(1, ("1", "a", "x")),
            Update(1, ("1", "a", "y"), ("1", "a", "x")),
            Delete(1, ("1", "a", "y")),
        ),
        [
            ("c/a", "insert", "1", {"id": 1, "chat": "a", "body": "x"}),
            ("c/a", "update", "1", {"id": 1, "chat": "a", "body": "y"}),
            ("c/a", "delete", "1", {"id": 1, "chat": "a", "body": "y"}),
        ],
        [],
    ),
    (
        "a row moving to another path leaves one and enters the other",
        txn(Update(1, ("1", "b", "x"), ("1", "a", "x"))),
        [
            ("c/a", "delete", "1", {"id": 1, "chat": "a", "body": "x"}),
            ("c/b", "insert", "1", {"id": 1, "chat": "b", "body": "x"}),
        ],
        [],
    ),
    (
        "a changed key deletes the old entity",
        txn(Update(1, ("2", "a", "x"), ("1", "a", "x"))),
        [
            ("c/a", "delete", "1", {"id": 1, "chat": "a", "body": "x"}),
            ("c/a", "insert", "2", {"id": 2, "chat": "a", "body": "x"}),
        ],
        [],
    ),
    (
        "an unchanged TOAST value comes from the old row",
        txn(Update(1, ("1", "a", Unchanged.TOAST), ("1", "a", "long"))),
        [("c/a", "update", "1", {"id": 1, "chat": "a", "body": "long"})],
        [],
    ),
    (
        "an unchanged TOAST value without an old row is left out",
        txn(Update(1, ("1", "a", Unchanged.TOAST))),
        [("c/a", "update", "1", {"id": 1, "chat": "a"})],
        ["toast"],
    ),
    (
        "a transaction the snapshot holds is skipped",
        txn(Insert(1, ("1", "a", "x")), xid=99),
        [],
        [],
    ),
    ("a null path column skips the change", txn(Insert(1, ("1", None, "x"))), [], ["path"]),
    ("a null key skips the change", txn(Insert(1, (None, "a", "x"))), [], ["key"]),
    ("truncate sends nothing", txn(Truncate((1,), 0)), [], ["truncate"]),
    (
        "a delete without the path column (default identity) is skipped",
        txn(Delete(1, ("1", None, None)), relation=RELATION),
        [],
        ["path"],
    ),
    (
        "a bad value skips the change",
        txn(
            Insert(1, ("1", "a", "x")),
            relation=Relation(1, "public", "t", "f", (*FULL.columns[:2], Column("body", 17, True))),
        ),
        [],
        ["value"],
    ),
    (
        "a column the table lost is left out",
        txn(Insert(1, ("1", "a")), relation=Relation(1, "public", "t", "f", FULL.columns[:2])),
        [("c/a", "insert", "1", {"id": 1, "chat": "a"})],
        ["column"],
    ),
]


@pytest.mark.parametrize(
    ("case", "transaction", "expected", "problems"), PLANS, ids=[p[0] for p in PLANS]
)
def test_what_a_transaction_appends(
    case: str,
    transaction: Transaction,
    expected: list[tuple[str, str, str, Any]],
    problems: list[str],
) -> None:
    plan = plan_transaction(transaction, {"public.t": [SPEC]}, LIVE, 64)
    assert ops(plan.appends) == expected
    assert [p.reason for p in plan.problems] == problems
    for messages in plan.appends.values():
        assert {m["headers"]["txid"] for m in messages} == {str(transaction.xid)}
        assert {m["type"] for m in messages} == {"row"}


def test_a_stream_not_started_yet_gets_nothing() -> None:
    plan = plan_transaction(txn(Insert(1, ("1", "a", "x"))), {"public.t": [SPEC]}, {}, 64)
    assert plan.appends == {} and plan.problems == []


def test_table_streams_are_configured_by_repeated_flags_or_one_variable() -> None:
    from relay.config import ConfigError, parse

    flags = ["--database-url", "postgresql://x/y"]
    flags += ["--table-stream", "a:p/{id}:columns=id,b", "--table-stream", "c:q/{id}:columns=id"]
    config = parse(flags)
    assert [s.name for s in parse_many(config.table_stream)] == [
        "public.a:p/{id}",
        "public.c:q/{id}",
    ]
    from_env = parse(
        [], {"RELAY_DATABASE_URL": "postgresql://x/y", "RELAY_TABLE_STREAM": config.table_stream}
    )
    assert from_env.table_stream == config.table_stream
    assert from_env.tables_url == "postgresql://x/y"
    with pytest.raises(ConfigError, match="--table-stream needs Postgres"):
        parse(["--table-stream", "a:p/{id}:columns=id"])
    with pytest.raises(ConfigError, match="invalid --table-stream"):
        parse([*flags[:2], "--table-stream", "a:p/{id}"])
    with pytest.raises(ConfigError, match="invalid --table-slot"):
        parse(["--table-slot", "Bad-Name"])
