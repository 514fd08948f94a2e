"""The caption text index (``--kind text``): ClickHouse's ``text`` skip index over the captions'
words, for keyword filters, keyword ranking and hybrid (keyword + vector) search.

The index::

    ALTER TABLE laion ADD INDEX caption_index lowerUTF8(caption) TYPE text(tokenizer = splitByNonAlpha)

**Tokenizer.** ``splitByNonAlpha`` over the lower-cased caption: a word is a maximal run of bytes
that are ASCII letters, ASCII digits or any non-ASCII character. Every other ASCII character
(space, punctuation, ``_``, control characters) separates words; non-ASCII characters never do
(``l'été`` → ``l``, ``été``; ``watercolor🎨art`` is one word; a no-break space does not split).
Lower-casing is Unicode's (``lowerUTF8``, ICU): ``CAFÉ`` finds ``café``. We chose it over the
``ngrams`` tokenizer (substring matches, an index several times larger) and over ``splitByString``
(only the separators one lists): LAION captions are mostly English and European-language prose
where words split on ASCII punctuation, and this is the tokenizer the engine's own token functions
default to. :func:`tokenize` is the same tokenizer in Python (tests check it against the engine's
``tokens()`` on hostile captions), so query words are split and lower-cased exactly as the index
split the captions, then passed as an ``Array(String)`` parameter — never SQL text.

The query expression is the index expression (``hasAnyTokens(lowerUTF8(caption), …)``), so a
keyword query gives the same rows with or without the index: with it, the engine reads the
posting lists and only the granules that hold the words; without it (or on parts the build has
not reached yet), it tokenizes the captions it scans.

Building is a mutation (``MATERIALIZE INDEX``) like the HNSW build: resumable after a crash
(the engine resumes its queued mutation when the store reopens; ``create_text_index`` run again
waits for that one). Declared before ingest (``laion ingest --index text``), every shard lands indexed.
"""

from __future__ import annotations

import re
import time
from typing import Any

from laion_search.errors import UsageError
from laion_search.index.hnsw import ProgressFn, _pending_build, _run_mutation
from laion_search.schema import MAX_WORDS_CHARS, TABLE, WORDS_MODES  # noqa: F401  (re-exported)
from laion_search.store import Store

TEXT_INDEX = "caption_index"
TEXT_INDEX_EXPR = "lowerUTF8(caption)"
TOKENIZER = "splitByNonAlpha"
TEXT_INDEX_TYPE = f"text(tokenizer = {TOKENIZER})"
#: distinct words in one keyword query (each is a posting list to read and a term to score)
MAX_WORDS = 64

#: ASCII bytes that are not letters or digits: splitByNonAlpha's separators
_SEPARATORS = re.compile(r"[\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]+")


def tokenize(text: str) -> list[str]:
    """The words of ``text`` as the index holds them: lower-cased, split on ASCII non-alphanumerics."""
    return [w for w in _SEPARATORS.split(text.lower()) if w]


def query_words(words: Any, mode: str = "any") -> list[str]:
    """A keyword query's distinct words, in order (``phrase``: every word, repeats kept), or a
    :class:`UsageError` naming ``--words`` and the problem."""
    if mode not in WORDS_MODES:
        raise UsageError(f"--words-mode must be one of {', '.join(WORDS_MODES)}, got {mode!r}")
    if not isinstance(words, str):
        raise UsageError(f"--words must be text, got {type(words).__name__}")
    if len(words) > MAX_WORDS_CHARS:
        raise UsageError(f"--words is {len(words):,} characters long; at most {MAX_WORDS_CHARS:,}")
    toks = tokenize(words)
    if not toks:
        raise UsageError(f"--words {words[:40]!r} has no word to search for (words are runs of letters and digits)")
    if mode != "phrase":
        toks = list(dict.fromkeys(toks))
    if len(toks) > MAX_WORDS:
        raise UsageError(f"--words has {len(toks):,} words; at most {MAX_WORDS}")
    return toks


def words_clause(mode: str, name: str = "words") -> str:
    """The WHERE clause of a keyword query whose words are the parameter ``name``."""
    if mode == "phrase":
        # the phrase as text: the engine splits it with the index's tokenizer (our words joined by spaces)
        return f"hasPhrase({TEXT_INDEX_EXPR}, {{{name}_phrase:String}})"
    func = "hasAllTokens" if mode == "all" else "hasAnyTokens"
    return f"{func}({TEXT_INDEX_EXPR}, {{{name}:Array(String)}})"


def words_params(words: list[str], mode: str, name: str = "words") -> dict[str, Any]:
    params: dict[str, Any] = {name: list(dict.fromkeys(words))}
    if mode == "phrase":
        params[f"{name}_phrase"] = " ".join(words)
    return params


#: The keyword ranking: the number of distinct query words the caption holds, plus a length norm
#: in (0, 0.5] — 1 / (1 + the caption's word count) — that ranks shorter captions first among
#: those holding as many query words (a short caption that names the words is about them; a 10 KB
#: one that mentions them once is not). Ties: lower id first. The engine has no BM25 yet.
def score_sql(name: str = "words") -> str:
    toks = f"tokens({TEXT_INDEX_EXPR}, '{TOKENIZER}')"
    return (f"(arrayCount(w -> has({toks}, w), {{{name}:Array(String)}}) + 1 / (1 + length({toks})))")


def score(caption: str, words: list[str]) -> float:
    """:func:`score_sql` in Python (tests use it as the reference)."""
    toks = tokenize(caption)
    have = set(toks)
    return sum(1 for w in dict.fromkeys(words) if w in have) + 1 / (1 + len(toks))


def matches(caption: str, words: list[str], mode: str) -> bool:
    """Whether a caption matches a keyword query (the reference for the engine's functions)."""
    toks = tokenize(caption)
    if mode == "any":
        return any(w in toks for w in words)
    if mode == "all":
        return all(w in toks for w in words)
    n = len(words)
    return any(toks[i:i + n] == words for i in range(len(toks) - n + 1))


def has_text_index(store: Store) -> bool:
    return any(r["name"] == TEXT_INDEX for r in _indexes(store))


def _indexes(store: Store) -> list[dict[str, Any]]:
    return store.cached("text_index", lambda: store.rows(
        "SELECT name, expr, type_full, data_compressed_bytes AS bytes_on_disk FROM "
        + store.layout.system("data_skipping_indices") + " WHERE database = currentDatabase() AND table = {t:String} "
        "AND type = 'text'", {"t": store.data_table}))


def declare_text_index(store: Store) -> bool:
    """Add the index without building it: parts inserted afterwards are indexed as they are
    written (each shard lands indexed); parts already there wait for :func:`create_text_index`.
    Returns whether it was added now."""
    existing = {r["name"]: r for r in _indexes(store)}
    if TEXT_INDEX in existing:
        have = re.sub(r"\s+", "", existing[TEXT_INDEX]["type_full"])
        if have != re.sub(r"\s+", "", TEXT_INDEX_TYPE) or existing[TEXT_INDEX]["expr"] != TEXT_INDEX_EXPR:
            raise UsageError(f"{TEXT_INDEX} exists with other parameters ({existing[TEXT_INDEX]['type_full']} on "
                             f"{existing[TEXT_INDEX]['expr']}): drop it first (laion index drop --kind text)")
        return False
    store.run_ddl(f"ALTER TABLE {store.data_table}{store.layout.on_cluster} ADD INDEX IF NOT EXISTS "
                          f"{TEXT_INDEX} {TEXT_INDEX_EXPR} TYPE {TEXT_INDEX_TYPE}")
    return True


def create_text_index(store: Store, *, progress: ProgressFn | None = None, poll_seconds: float = 0.2) -> dict[str, Any]:
    """Add the caption text index (if absent) and build it on every part, with progress.
    Rerun after a crash, it waits for the build the engine resumed instead of starting over."""
    emit = progress or (lambda e: None)
    if not store.has_table():
        raise UsageError("no laion table here: ingest shards first (or declare the index on ingest: --index text)")
    t0 = time.perf_counter()
    declare_text_index(store)
    if not _pending_build(store, TEXT_INDEX):
        _run_mutation(store, TEXT_INDEX, f"MATERIALIZE INDEX {TEXT_INDEX}", emit, poll_seconds)
    else:
        _run_mutation(store, TEXT_INDEX, "", emit, poll_seconds)  # the engine resumed it: wait for it
    store.clear_caches()  # the mutation finished in the engine's own time: re-read what is indexed
    seconds = time.perf_counter() - t0
    rows = store.scalar(f"SELECT count() FROM {TABLE}") or 0
    emit({"event": "index_done", "index": TEXT_INDEX, "seconds": round(seconds, 3), "rows": rows})
    size = sum(int(r["bytes_on_disk"] or 0) for r in _indexes(store))
    return {"index": TEXT_INDEX, "type": f"{TEXT_INDEX_TYPE} on {TEXT_INDEX_EXPR}", "seconds": seconds, "rows": rows,
            "vectors_per_second": None, "rows_per_second": rows / seconds if seconds > 0 else None,
            "bytes_on_disk": size, "bytes_per_row": size / rows if rows else None}


def drop_text_index(store: Store) -> bool:
    existed = has_text_index(store)
    store.run_ddl(f"ALTER TABLE {store.data_table}{store.layout.on_cluster} DROP INDEX IF EXISTS {TEXT_INDEX}")
    return existed


def text_index_status(store: Store) -> list[dict[str, Any]]:
    """The text index as ``laion index status`` lists it (empty without one)."""
    idx = [r for r in _indexes(store) if r["name"] == TEXT_INDEX]
    if not idx:
        return []
    parts = store.rows("SELECT name, rows, secondary_indices_compressed_bytes AS b FROM " + store.layout.system("parts")
                       + " WHERE database = currentDatabase() AND table = {t:String} AND active AND rows > 0",
                       {"t": store.data_table})
    rows = sum(int(p["rows"]) for p in parts)
    # system.parts sizes skip indexes per part, not per index: a part counts as covered once it
    # carries any (exact when the text index is the table's only skip index)
    covered = [p for p in parts if int(p["b"] or 0) > 0]
    size = int(idx[0]["bytes_on_disk"] or 0)
    return [{"name": TEXT_INDEX, "column": idx[0]["expr"], "method": "text", "tokenizer": TOKENIZER,
             "type": idx[0]["type_full"], "parts": len(parts), "parts_covered": len(covered), "rows": rows,
             "rows_covered": sum(int(p["rows"]) for p in covered), "bytes_on_disk": size,
             "bytes_per_row": round(size / rows, 2) if rows else None,
             # posting lists and dictionary blocks are read from disk through the page cache
             "memory_bytes_estimate": 0}]
