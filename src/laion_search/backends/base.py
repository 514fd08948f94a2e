"""The one boundary between laion-search and a ClickHouse engine.

A backend does five things: run a statement with query parameters, fetch a result as an
Arrow table (or as the engine's own text format), insert an Arrow table, and close. Everything above it (store, ingest, search,
CLI, HTTP) is written against :class:`Backend` only, so the embedded chDB engine and a
ClickHouse server run the same SQL.

User values always travel as query parameters (``{name:Type}`` placeholders); identifiers
come from fixed sets chosen by the caller, never from users.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Protocol

import numpy as np
import pyarrow as pa


Params = Mapping[str, Any]


class Backend(Protocol):
    """What the store needs from an engine."""

    #: ``chdb`` or ``clickhouse``
    name: str
    location: str
    #: whether the engine runs in this process (one process owns the store)
    embedded: bool

    def command(self, sql: str, params: Params | None = None) -> None: ...

    def query_arrow(self, sql: str, params: Params | None = None) -> pa.Table: ...

    def query_text(self, sql: str, params: Params | None = None, fmt: str = "CSV") -> str: ...

    def rows_read(self, sql: str, params: Params | None = None) -> int | None:
        """Run a query; the rows the engine read for it (its progress counters), None if unknown."""
        ...

    def query_raw(self, sql: str, params: Params | None = None, *, fmt: str = "JSONCompact",
                  settings: Mapping[str, Any] | None = None, readonly: bool = False) -> bytes:
        """The result as the engine writes it in output format ``fmt``, with ``settings`` for this
        statement; ``readonly``: in a read-only session (``readonly = 1``), so that the statement
        can neither write nor change a setting, its own ``SETTINGS`` clause included."""
        ...

    def insert_arrow(self, table: str, data: pa.Table, settings: Mapping[str, Any] | None = None) -> None: ...

    def close(self) -> None: ...


def format_param(value: Any) -> str:
    """Render a Python value as the text ClickHouse expects for a query parameter.

    The engine parses this text as a value of the placeholder's declared type, so it can never
    become SQL. A top-level String is read with TSV escaping (``\\t``, ``\\n``, ``\\\\``); strings
    inside arrays are quoted literals with backslash escapes. Either way the value arrives exactly.
    """
    if isinstance(value, str):
        return value.translate(_TSV)
    return _literal(value)


_TSV = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\0"})


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.translate(_TSV).replace("'", "\\'") + "'"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, np.ndarray):
        if value.dtype == np.float32 and value.ndim == 1:
            # query vectors: 9 significant digits round-trip a float32 exactly, in ~2/3 of repr's
            # text (less for the engine to parse) and ~2.5× faster to format
            return "[" + ",".join(["%.9g" % v for v in value.tolist()]) + "]"
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    raise TypeError(f"unsupported query parameter type: {type(value).__name__}")


def format_setting(value: Any) -> str:
    """A setting's value as SQL text (settings our code chooses, never users')."""
    return f"'{value}'" if isinstance(value, str) else format_param(value)


def settings_sql(settings: Mapping[str, Any]) -> str:
    """`` SETTINGS a = 1, b = 'x'`` for settings our code chooses (names and values never come
    from users); empty when there are none."""
    if not settings:
        return ""
    parts = [f"{k} = {format_setting(v)}" for k, v in settings.items()]
    return " SETTINGS " + ", ".join(parts)


_CODE_RE = re.compile(r"\s*\(version [^)]*\)")


def clean_engine_message(message: str) -> str:
    """Keep the engine's first meaningful line: no stack traces, no version suffix."""
    text = str(message).strip()
    text = text.split("Stack trace", 1)[0].strip()
    text = _CODE_RE.sub("", text)
    # chDB sometimes nests "Code: N. DB::Exception: Code: N. DB::Exception: …"
    while text.count("DB::Exception:") > 1:
        text = text.split("DB::Exception:", 1)[1].strip()
    return text.splitlines()[0] if text else "unknown engine error"


#: ``SET name = value``: a statement that changes the session, not a query
_SET_RE = re.compile(r"^\s*SET\s+([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.+?)\s*;?\s*$", re.I | re.S)
