"""A table stream's definition: which table, which stream path, which entity, which columns.

Written as ``TABLE:PATH[:option=value...]``, for example
``chats:chat/{id}/state:type=chat:key=id:columns=id,title,updated_at``. Options: ``columns``
(required: only these are ever sent), ``type`` (the entity type, default the table's name),
``key`` (columns whose values make the entity key, default the table's replica identity). The
path is a template whose ``{column}`` parts are filled from the row.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_TABLE = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_$]*\.)?[A-Za-z_][A-Za-z0-9_$]*")
_FIELD = re.compile(r"\{([^{}]*)\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NEXT_DEFINITION = re.compile(r",(?=[A-Za-z0-9_$.]+:[^:=]*(?::|$))")
"""Where comma-joined definitions split: before ``table:path`` (a path holds no ``=``; a
column list's commas are followed by a name and then a comma, a colon and ``option=``, or the
end)."""

RESERVED_SEGMENT = "__ds"  # the protocol's control prefix: never a stream's first segment


@dataclass(frozen=True, slots=True)
class TableStream:
    """One table stream, as declared."""

    table: str  # schema-qualified: public.chats
    path: str  # a template: chat/{id}/state
    columns: tuple[str, ...]
    type: str
    key: tuple[str, ...] = ()  # empty: the table's replica identity

    @property
    def name(self) -> str:
        """What identifies the table stream (``relay tables drop`` takes it)."""
        return f"{self.table}:{self.path}"

    @property
    def schema_name(self) -> str:
        return self.table.split(".", 1)[0]

    @property
    def table_name(self) -> str:
        return self.table.split(".", 1)[1]

    @property
    def path_columns(self) -> tuple[str, ...]:
        return tuple(_FIELD.findall(self.path))

    def render(self) -> str:
        """The definition as ``parse`` reads it."""
        parts = [self.table, self.path, f"type={self.type}"]
        if self.key:
            parts.append("key=" + ",".join(self.key))
        parts.append("columns=" + ",".join(self.columns))
        return ":".join(parts)


def parse(text: str) -> TableStream:
    """Read one definition. Raises ValueError naming what is wrong."""
    parts = text.strip().split(":")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"{text!r}: expected TABLE:PATH:columns=A,B[:type=T][:key=K]")
    table, path = parts[0], parts[1].strip("/")
    if not _TABLE.fullmatch(table):
        raise ValueError(f"{table!r} is not a table name (schema.table or table)")
    if "." not in table:
        table = "public." + table
    options: dict[str, str] = {}
    for part in parts[2:]:
        name, eq, value = part.partition("=")
        if not eq or name not in ("type", "key", "columns"):
            raise ValueError(f"{part!r}: options are type=, key= and columns=")
        if name in options:
            raise ValueError(f"{name}= is given twice")
        options[name] = value
    if "columns" not in options:
        raise ValueError(f"{text!r}: columns= is required (only named columns are sent)")
    columns = _names(options["columns"], "columns")
    key = _names(options["key"], "key") if "key" in options else ()
    entity = options.get("type") or table.split(".", 1)[1]
    _check_template(path, columns)
    missing = [k for k in key if k not in columns]
    if missing:
        raise ValueError(f"key column {missing[0]!r} must be one of columns=")
    return TableStream(table, path, columns, entity, key)


def parse_many(text: str) -> tuple[TableStream, ...]:
    """Definitions joined with commas (a repeated flag, or ``RELAY_TABLE_STREAM``)."""
    specs = tuple(parse(part) for part in _NEXT_DEFINITION.split(text) if part.strip())
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"{name} is declared twice")
    return specs


def _names(text: str, option: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError(f"{option}= names no column")
    for name in names:
        if not _IDENT.fullmatch(name):
            raise ValueError(f"{option}=: {name!r} is not a column name")
    if len(set(names)) != len(names):
        raise ValueError(f"{option}= names a column twice")
    return names


def _check_template(path: str, columns: tuple[str, ...]) -> None:
    if "{" in _FIELD.sub("", path) or "}" in _FIELD.sub("", path):
        raise ValueError(f"path {path!r} has an unbalanced brace")
    for column in _FIELD.findall(path):
        if column not in columns:
            raise ValueError(f"path column {{{column}}} must be one of columns=")
    if _CONTROL.search(path):
        raise ValueError("path contains control characters")
    segments = path.split("/")
    if any(s in ("", ".", "..") for s in segments) or segments[0] == RESERVED_SEGMENT:
        raise ValueError(f"path {path!r} is not a valid stream path")


def fill_path(template: str, row: Mapping[str, object], max_length: int) -> str | None:
    """The stream path for ``row``, or None when a path column is null, empty, holds ``/``
    or a control character, or makes a ``.``/``..`` segment or a path too long."""
    bad = False

    def value(match: re.Match[str]) -> str:
        nonlocal bad
        found = row.get(match.group(1))
        text = found if isinstance(found, str) else None if found is None else str(found)
        if not text or "/" in text or text in (".", "..") or _CONTROL.search(text):
            bad = True
            return ""
        return text

    path = _FIELD.sub(value, template)
    if bad or len(path.encode()) > max_length:
        return None
    return path
