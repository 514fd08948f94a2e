"""Every error laion-search raises on purpose derives from :class:`LaionError`.

::

    LaionError                      base: catch this to catch everything of ours
    ├── UsageError                  a bad argument (shard range, parameter, k, vector …)
    │   └── ModalityError           the table has no such embeddings (text search, image-only data)
    ├── ShardError                  a shard file is missing, malformed or inconsistent
    │   └── ShardValidationError    its content breaks a rule (row counts, dtype, NaN …)
    ├── StoreError                  the store cannot do what was asked
    │   ├── StoreBusyError          another process holds the embedded store's lock
    │   └── QueryError              the engine rejected a statement (wraps chDB / server errors)
    ├── EncoderError                CLIP model missing/unloadable, or an input it cannot encode
    │   └── EncoderUnavailable      a server's start-up check found no usable encoder (or is still running)
    ├── DownloadError               a shard file could not be downloaded (after the retry budget)
    ├── Overloaded                  a server's queue for this class of query is full (retry after a while)
    ├── ShuttingDown                a server is stopping: a queued query is refused, not run
    └── ServeError                  a server cannot listen on its address (the port is taken …)

Third-party errors are re-raised as ours with ``raise … from`` so callers (CLI, HTTP API)
only need to know this tree, and the original is kept as ``__cause__``.
"""

from __future__ import annotations


class LaionError(Exception):
    """Base class of every error raised on purpose by laion-search."""


class UsageError(LaionError, ValueError):
    """An argument is invalid (shard range, query parameter, vector, k …)."""


class ModalityError(UsageError):
    """The table holds no embeddings of the asked modality (``text`` on an image-only source).

    A valid argument that this table's data cannot serve: the CLI exits with status 1 (not 2)."""

    exit_code = 1


class ShardError(LaionError):
    """A shard's files are missing, unreadable or disagree with each other."""

    def __init__(self, message: str, *, path: str | None = None, shard: int | None = None):
        self.path = path
        self.shard = shard
        prefix = f"{path}: " if path else ""
        super().__init__(prefix + message)


class ShardValidationError(ShardError):
    """A shard's content breaks a rule (dtype, dimension, NaN/Inf, zero vectors …)."""


class StoreError(LaionError):
    """The store could not carry out an operation."""


class StoreBusyError(StoreError):
    """The embedded store's directory is locked by another process."""


class QueryError(StoreError):
    """The engine rejected a statement; the message is the engine's, without the stack."""


class EncoderError(LaionError):
    """A CLIP model could not be loaded, or an input (text, image) could not be encoded.

    ``reason`` is what went wrong and ``fix`` (when there is one) the sentence that says what to
    do; the message is both, on one line. A server shows them apart (``/api/status``)."""

    def __init__(self, message: str, *, fix: str | None = None):
        self.reason = message
        self.fix = fix
        super().__init__(f"{message}. {fix}" if fix else message)


class EncoderUnavailable(EncoderError):
    """A server has no usable CLIP encoder: its start-up check failed (the message says why and
    how to fix it), or is still running (``retry_after`` seconds)."""

    def __init__(self, message: str, *, retry_after: int | None = None):
        self.retry_after = retry_after
        super().__init__(message)


class DownloadError(LaionError):
    """A file could not be downloaded: a final HTTP status, or the retry budget ran out."""


class Overloaded(LaionError):
    """A server sheds a query: the admission queue of its class (exact scans, encodings) is
    full. ``retry_after`` is the seconds to wait before retrying."""

    def __init__(self, message: str, *, retry_after: int = 1):
        self.retry_after = retry_after
        super().__init__(message)


class ShuttingDown(LaionError):
    """A server is shutting down (SIGTERM): a query still waiting for its turn is refused at
    once instead of being run (HTTP 503)."""


class ServeError(LaionError):
    """``laion serve`` cannot listen on its host and port: the port is taken, the address is not
    this machine's, or binding it needs a privilege. Found before the store is opened."""
