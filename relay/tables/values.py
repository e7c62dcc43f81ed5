"""Postgres column values (their text output, as pgoutput sends them) as JSON values.

Exact where JSON can be: integers as numbers, ``numeric`` as strings (JSON readers parse
numbers as doubles and would round), floats as numbers (``NaN`` and infinities as strings),
booleans, ``json``/``jsonb`` as the JSON they hold, ``bytea`` as base64 strings, timestamps
as ISO 8601 strings (``timestamptz`` in UTC with ``Z``; the follower's session runs in UTC),
dates and times as Postgres writes them in ISO style, every other type (uuid, text, arrays,
enums...) as its text output.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

BOOL, BYTEA, INT8, INT2, INT4, OID = 16, 17, 20, 21, 23, 26
JSON, FLOAT4, FLOAT8, TIMESTAMP, TIMESTAMPTZ, NUMERIC, JSONB = 114, 700, 701, 1114, 1184, 1700, 3802
_INTEGERS = frozenset({INT2, INT4, INT8, OID})


def to_json(type_oid: int, text: str | None) -> Any:
    """``text`` (a column's text output, or None for NULL) as a JSON-ready value."""
    if text is None:
        return None
    if type_oid in _INTEGERS:
        return int(text)
    if type_oid == BOOL:
        return text in ("t", "true")  # boolout, or the bool-to-text cast a snapshot uses
    if type_oid in (FLOAT4, FLOAT8):
        value = float(text)
        return value if math.isfinite(value) else text
    if type_oid in (JSON, JSONB):
        return json.loads(text)
    if type_oid == BYTEA:
        if not text.startswith("\\x"):
            raise ValueError("bytea not in hex output (set bytea_output = hex)")
        return base64.b64encode(bytes.fromhex(text[2:])).decode("ascii")
    if type_oid in (TIMESTAMP, TIMESTAMPTZ):
        return iso_timestamp(text)
    return text  # numeric, text, uuid, dates, arrays...: their exact text


def iso_timestamp(text: str) -> str:
    """``2024-05-01 12:00:00.5+00`` (ISO DateStyle) as ``2024-05-01T12:00:00.5Z``; an offset
    other than UTC keeps it as ``+hh:mm``; ``infinity`` and BC dates stay as written."""
    if " " not in text or text.endswith(" BC") or text[0] not in "0123456789":
        return text
    stamp = text.replace(" ", "T", 1)
    for sign in ("+", "-"):
        at = stamp.rfind(sign, 19)  # past the date's dashes
        if at > 0:
            zone = stamp[at + 1 :]
            if zone in ("00", "00:00"):
                return stamp[:at] + "Z"
            if len(zone) == 2:
                return stamp + ":00"
            return stamp
    return stamp
