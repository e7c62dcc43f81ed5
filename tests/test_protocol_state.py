"""Folding State Protocol messages into live rows (protocol/state.py), one row per rule."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.state import NotStateProtocol, fold, snapshot


def change(operation: str, key: str, value: Any = None, entity: str = "chat") -> dict[str, Any]:
    message: dict[str, Any] = {"type": entity, "key": key, "headers": {"operation": operation}}
    if operation != "delete":
        message["value"] = value
    return message


def control(kind: str) -> dict[str, Any]:
    return {"headers": {"control": kind}}


FOLDS: list[tuple[str, list[dict[str, Any]], dict[tuple[str, str], Any]]] = [
    ("nothing", [], {}),
    ("an insert makes a row", [change("insert", "1", {"t": "a"})], {("chat", "1"): {"t": "a"}}),
    (
        "an update replaces the value whole",
        [change("insert", "1", {"t": "a", "n": 1}), change("update", "1", {"t": "b"})],
        {("chat", "1"): {"t": "b"}},
    ),
    ("a delete drops the row", [change("insert", "1", 1), change("delete", "1")], {}),
    ("a delete of an absent row is nothing", [change("delete", "9")], {}),
    ("an update of an absent row makes it", [change("update", "1", 2)], {("chat", "1"): 2}),
    (
        "an insert again replaces (a repeated publish)",
        [change("insert", "1", 1), change("insert", "1", 1)],
        {("chat", "1"): 1},
    ),
    (
        "type and key together name a row",
        [change("insert", "1", "c"), change("insert", "1", "m", entity="message")],
        {("chat", "1"): "c", ("message", "1"): "m"},
    ),
    (
        "reset drops every row before it",
        [change("insert", "1", 1), control("reset"), change("insert", "2", 2)],
        {("chat", "2"): 2},
    ),
    (
        "snapshot brackets change nothing",
        [control("snapshot-start"), change("insert", "1", 1), control("snapshot-end")],
        {("chat", "1"): 1},
    ),
    ("a null value is a value", [change("insert", "1", None)], {("chat", "1"): None}),
    (
        "delete then insert brings it back",
        [change("insert", "1", 1), change("delete", "1"), change("insert", "1", 3)],
        {("chat", "1"): 3},
    ),
]


@pytest.mark.parametrize(("case", "messages", "rows"), FOLDS, ids=[f[0] for f in FOLDS])
def test_fold(case: str, messages: list[dict[str, Any]], rows: dict[tuple[str, str], Any]) -> None:
    assert fold(messages) == rows


def test_fold_continues_from_earlier_rows_without_changing_them() -> None:
    earlier = fold([change("insert", "1", 1), change("insert", "2", 2)])
    later = fold([change("delete", "1")], earlier)
    assert later == {("chat", "2"): 2}
    assert earlier == {("chat", "1"): 1, ("chat", "2"): 2}


def test_folding_the_snapshot_gives_the_same_rows_in_the_same_order() -> None:
    rows = fold([change("insert", "b", 1), change("insert", "a", 2), change("update", "b", 3)])
    messages = snapshot(rows)
    assert messages[0] == control("snapshot-start") and messages[-1] == control("snapshot-end")
    assert list(fold(messages).items()) == list(rows.items())


REFUSED: list[tuple[str, Any, str]] = [
    ("not an object", [1], "not an object with headers"),
    ("no headers", [{"type": "chat", "key": "1"}], "not an object with headers"),
    (
        "unknown operation",
        [{"type": "c", "key": "1", "headers": {"operation": "upsert"}}],
        "upsert",
    ),
    ("unknown control", [control("rewind")], "unknown control"),
    ("no key", [{"type": "c", "value": 1, "headers": {"operation": "insert"}}], "type and key"),
    (
        "empty type",
        [{"type": "", "key": "1", "value": 1, "headers": {"operation": "insert"}}],
        "type",
    ),
    (
        "insert without a value",
        [{"type": "c", "key": "1", "headers": {"operation": "insert"}}],
        "value",
    ),
]


@pytest.mark.parametrize(("case", "messages", "reason"), REFUSED, ids=[r[0] for r in REFUSED])
def test_messages_that_are_not_state_protocol_refuse_the_fold(
    case: str, messages: list[Any], reason: str
) -> None:
    with pytest.raises(NotStateProtocol, match=reason) as refused:
        fold([change("insert", "ok", 1), *messages])
    assert refused.value.index == 1
