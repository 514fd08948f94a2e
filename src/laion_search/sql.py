"""User SQL: what a statement may be before the engine runs it, its ``FORMAT`` clause, and the
limits of the HTTP API's SQL endpoint (``laion serve --allow-sql``).

Two guards, either enough for what it covers:

* :func:`check_read_only_sql` reads the statement's tokens (strings, quoted names, heredocs and
  comments skipped as the engine skips them) and refuses, each with its own one-line reason,
  more than one statement, anything but ``SELECT`` / ``WITH``, a ``SETTINGS`` or ``FORMAT``
  clause, ``INTO OUTFILE``, table functions that reach outside the store (``url``, ``file``,
  ``s3``, ``remote``…) and the system tables that hold credentials;
* :func:`run_read_only_sql` runs it in an engine session of its own that is read-only
  (``readonly = 1``: no writes, no table function that needs them, and no setting the query
  could change, its own ``SETTINGS`` included) under :data:`SQL_LIMITS`: rows read, memory,
  result size, time, threads and the exact scans' low CPU priority. Number generators
  (``numbers(…)``, ``system.numbers``, ``generateRandom``) are bounded by the rows-read limit.

Every answer is JSON: the engine writes ``JSONCompact`` and this module turns it into
``{"columns", "types", "rows", "rows_read", "truncated"}``, whatever the columns' types.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterator

from laion_search.errors import QueryError, UsageError

#: Rows one SQL endpoint query may read, all tables and generators together (the engine's
#: ``max_rows_to_read``; ``numbers(1e12)`` is refused from its estimate, before it runs).
SQL_MAX_ROWS_TO_READ = 1_000_000_000
#: Memory one SQL endpoint query may hold (``max_memory_usage``).
SQL_MAX_MEMORY = 2 << 30
#: Rows an answer holds at most; the engine stops there (``truncated`` says so).
SQL_MAX_RESULT_ROWS = 10_000
#: Bytes an answer holds at most, likewise.
SQL_MAX_RESULT_BYTES = 64 << 20
#: Characters a statement may have.
SQL_MAX_CHARS = 20_000

#: Table functions that reach outside the store (files, URLs, other servers, programs) or read
#: what the caller did not send: refused by name, before the engine sees them.
FORBIDDEN_FUNCTIONS = frozenset(name.lower() for name in (
    "file", "url", "urlCluster", "s3", "s3Cluster", "hdfs", "hdfsCluster", "remote", "remoteSecure", "mysql",
    "postgresql", "jdbc", "odbc", "executable", "input", "cluster", "clusterAllReplicas", "azureBlobStorage",
    "azureBlobStorageCluster", "gcs", "sqlite", "mongodb", "redis", "python", "dictionary", "fileCluster",
    "iceberg", "icebergS3", "icebergAzure", "icebergHDFS", "icebergLocal", "deltaLake", "deltaLakeS3",
    "deltaLakeAzure", "hudi", "arrowFlight", "ytsaurus", "loop", "merge", "view", "viewIfPermitted"))
#: System tables that hold credentials or access rights.
FORBIDDEN_SYSTEM_TABLES = frozenset({"users", "grants", "settings_profiles", "quotas", "roles", "role_grants",
                                     "settings_profile_elements", "row_policies", "quota_usage", "quotas_usage"})


@dataclass(frozen=True)
class Token:
    kind: str   # word | string | name (quoted identifier) | number | punct
    text: str
    depth: int  # parentheses around it
    start: int  # where it starts in the statement


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_NUMBER = re.compile(r"(?:0[xX][0-9a-fA-F_]+|0[bB][01_]+|(?:\d[\d_]*)?\.?\d[\d_]*(?:[eE][+-]?\d+)?)")
_HEREDOC = re.compile(r"\$([A-Za-z0-9_]*)\$")


def tokens(sql: str) -> Iterator[Token]:
    """The statement's tokens, as ClickHouse's lexer sees them: whitespace and comments (``--``,
    ``#``, ``/* */``, nested) dropped, strings (``'…'`` with backslash escapes and doubled quotes),
    quoted names (``"…"``, `` `…` ``) and heredocs (``$tag$…$tag$``) kept whole. An unterminated
    string or comment is a :class:`UsageError`."""
    i, n, depth = 0, len(sql), 0
    while i < n:
        c = sql[i]
        if c.isspace():
            i += 1
        elif sql.startswith("--", i) or c == "#":
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            level, i = 1, i + 2
            while level:
                if i >= n:
                    raise UsageError("the query has an unterminated /* comment")
                if sql.startswith("/*", i):
                    level, i = level + 1, i + 2
                elif sql.startswith("*/", i):
                    level, i = level - 1, i + 2
                else:
                    i += 1
        elif c in "'\"`":
            j = i + 1
            while True:
                if j >= n:
                    raise UsageError("the query has an unterminated quote")
                if sql[j] == "\\":
                    j += 2
                elif sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:  # doubled quote
                        j += 2
                    else:
                        break
                else:
                    j += 1
            yield Token("string" if c == "'" else "name", sql[i:j + 1], depth, i)
            i = j + 1
        elif c == "$" and (m := _HEREDOC.match(sql, i)):
            end = sql.find(m.group(0), m.end())
            if end < 0:
                raise UsageError("the query has an unterminated heredoc")
            yield Token("string", sql[i:end + len(m.group(0))], depth, i)
            i = end + len(m.group(0))
        elif m := _WORD.match(sql, i):
            yield Token("word", m.group(0), depth, i)
            i = m.end()
        elif c.isdigit() or (c == "." and i + 1 < n and sql[i + 1].isdigit()):
            m2 = _NUMBER.match(sql, i)
            end = m2.end() if m2 and m2.end() > i else i + 1
            yield Token("number", sql[i:end], depth, i)
            i = end
        else:
            if c == "(":
                yield Token("punct", c, depth, i)
                depth += 1
            elif c == ")":
                depth = max(0, depth - 1)
                yield Token("punct", c, depth, i)
            else:
                yield Token("punct", c, depth, i)
            i += 1


def _word(t: Token | None, *words: str) -> bool:
    return t is not None and t.kind == "word" and t.text.upper() in words


def format_clause(sql: str) -> tuple[str, str] | None:
    """``(statement without it, format name)`` for a statement that ends in a ``FORMAT name`` clause
    (optionally followed by ``SETTINGS …`` or a ``;``), else None. ``format(…)`` the function and
    a column called ``format`` are not the clause."""
    toks = list(tokens(sql))
    for i, t in enumerate(toks):
        if not (_word(t, "FORMAT") and t.depth == 0 and i + 1 < len(toks) and toks[i + 1].kind in ("word", "name")):
            continue
        rest = [r for r in toks[i + 2:] if r.text != ";"]
        if not rest or _word(rest[0], "SETTINGS"):
            name = toks[i + 1].text.strip("`\"")
            tail = sql[rest[0].start:].strip().rstrip(";") if rest else ""
            return (sql[:t.start].rstrip() + (" " + tail if tail else "")).strip(), name
    return None


def check_read_only_sql(sql: str) -> str:
    """The statement, checked for the SQL endpoint (a trailing ``;`` dropped), or a
    :class:`UsageError` saying what is not allowed and why."""
    if not isinstance(sql, str) or not sql.strip():
        raise UsageError("query: the SQL statement is empty")
    if len(sql) > SQL_MAX_CHARS:
        raise UsageError(f"query: the SQL statement is longer than {SQL_MAX_CHARS:,} characters")
    toks = list(tokens(sql))
    while toks and toks[-1].text == ";":
        toks.pop()
    if not toks:
        raise UsageError("query: the SQL statement is empty")
    if any(t.text == ";" for t in toks):
        raise UsageError("query: one statement at a time (the query has a ';' inside)")
    if not _word(toks[0], "SELECT", "WITH") and not (toks[0].text == "(" and any(_word(t, "SELECT") for t in toks)):
        raise UsageError(f"query: only SELECT statements (or WITH … SELECT) are allowed, not {toks[0].text}")
    clause = format_clause(sql)
    if clause:
        raise UsageError(f"query: a FORMAT clause is not allowed (FORMAT {clause[1]}): the SQL endpoint always "
                         "answers JSON ({\"columns\", \"rows\"}); leave the clause out")
    for i, t in enumerate(toks):
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if _word(t, "SETTINGS"):
            raise UsageError("query: a SETTINGS clause is not allowed: the SQL endpoint's limits (time, rows read, "
                             "memory, threads) are the server's")
        if _word(t, "INTO") and _word(nxt, "OUTFILE"):
            raise UsageError("query: INTO OUTFILE is not allowed: the SQL endpoint writes no files")
        if t.kind == "word" and nxt is not None and nxt.text == "(" and t.text.lower() in FORBIDDEN_FUNCTIONS:
            prev = toks[i - 1] if i else None
            if prev is None or prev.text != ".":
                raise UsageError(f"query: the table function {t.text}() is not allowed: the SQL endpoint reads the "
                                 "store's tables only")
        if t.kind in ("word", "name") and t.text.strip("`\"").lower() == "system" and nxt is not None \
                and nxt.text == "." and i + 2 < len(toks) \
                and toks[i + 2].text.strip("`\"").lower() in FORBIDDEN_SYSTEM_TABLES:
            table = toks[i + 2].text.strip("`\"")
            raise UsageError(f"query: system.{table} is not readable through the SQL endpoint")
    return sql.strip().rstrip(";").rstrip()


@dataclass(frozen=True)
class SqlLimits:
    """What one SQL endpoint query may use; :meth:`settings` are the engine's names for them."""

    seconds: float = 30.0
    max_rows_to_read: int = SQL_MAX_ROWS_TO_READ
    max_memory: int = SQL_MAX_MEMORY
    max_result_rows: int = SQL_MAX_RESULT_ROWS
    threads: int = 1
    nice: int = 19

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_rows_to_read": int(self.max_rows_to_read), "read_overflow_mode": "throw",
            "max_memory_usage": int(self.max_memory),
            "max_result_rows": int(self.max_result_rows) + 1, "max_result_bytes": SQL_MAX_RESULT_BYTES,
            "result_overflow_mode": "break",
            "max_threads": max(1, int(self.threads)),
            # JSON numbers for 64-bit integers, and valid UTF-8 whatever a String holds
            "output_format_json_quote_64bit_integers": 0, "output_format_json_validate_utf8": 1,
        }
        if self.seconds:
            out["max_execution_time"] = float(self.seconds)
        if self.nice:
            out["os_thread_priority"] = min(19, max(0, int(self.nice)))
        return out


_CODE = re.compile(r"\bCode: (\d+)\b")
_SETTING = re.compile(r"Cannot modify '([^']+)' setting")


def explain_engine_error(message: str, limits: SqlLimits) -> str:
    """The engine's refusal of an SQL endpoint query, said in terms of the endpoint's limits."""
    m = _CODE.search(message)
    code = int(m.group(1)) if m else None
    if code == 164:
        s = _SETTING.search(message)
        if s:
            return (f"query: settings cannot be changed through the SQL endpoint ({s.group(1)}): its limits "
                    "are the server's")
        return "query: the SQL endpoint is read-only: this statement or table function needs write access"
    if code == 158:
        return (f"query: it would read more than {limits.max_rows_to_read:,} rows, the SQL endpoint's limit "
                "(add a WHERE or LIMIT, or query fewer rows)")
    if code == 159:
        return f"query: it ran past the SQL endpoint's time limit ({limits.seconds:g} s)"
    if code == 241:
        return f"query: it needs more than {limits.max_memory / 2**30:g} GiB of memory, the SQL endpoint's limit"
    if code == 497:
        return "query: not allowed: " + re.sub(r"^.*?DB::Exception: (default: )?", "", message)
    return message


def run_read_only_sql(store: Any, sql: str, limits: SqlLimits | None = None) -> dict[str, Any]:
    """Run a statement :func:`check_read_only_sql` passed, read-only and within ``limits``; its
    rows as JSON-ready values (a :class:`QueryError` with the endpoint's reason when the engine
    refuses it)."""
    limits = limits or SqlLimits()
    text = check_read_only_sql(sql)
    try:
        raw = store.query_raw(text, fmt="JSONCompact", settings=limits.settings(), readonly=True)
    except QueryError as exc:
        raise QueryError(explain_engine_error(str(exc), limits)) from exc
    if not raw.strip():
        return {"columns": [], "types": [], "rows": [], "rows_read": 0, "truncated": False}
    try:
        doc = json.loads(raw)
    except ValueError as exc:  # one statement gives one document; anything else is not ours to pass on
        raise QueryError("query: the engine's answer is not one JSON document") from exc
    names = [c["name"] for c in doc.get("meta", [])]
    data = doc.get("data", [])
    # the engine stops after max_result_rows + 1 rows (at a block's end): more than the limit
    # means the answer is cut
    rows = [dict(zip(names, r)) for r in data[:limits.max_result_rows]]
    return {"columns": names, "types": [c["type"] for c in doc.get("meta", [])], "rows": rows,
            "rows_read": int(doc.get("statistics", {}).get("rows_read", 0)),
            "truncated": len(data) > limits.max_result_rows}
