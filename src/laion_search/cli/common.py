"""What every ``laion`` command shares: the store options, opening the store, and turning
library errors into one line and an exit status."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import typer

from laion_search.cli import output
from laion_search.errors import LaionError, UsageError

DbOption = typer.Option(None, "--db", envvar="LAION_DB", show_envvar=True,
                        help="Store directory (embedded chDB), or a ClickHouse URL. "
                             "Default: ~/.local/share/laion-search/db.")
UrlOption = typer.Option(None, "--url", envvar="LAION_URL", show_envvar=True,
                         help="ClickHouse server/cluster/Cloud instead of the embedded store: "
                              "clickhouse://user:password@host:8123/db (clickhouses://…:8443 for TLS). Wins over --db.")
JsonOption = typer.Option(False, "--json", help="Machine-readable JSON output.")


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Library errors become ``error: …`` on stderr and exit 1 (2 for usage errors)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LaionError as exc:
            raise typer.Exit(report_error(exc)) from None
        except KeyboardInterrupt:
            output.err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def report_error(exc: LaionError) -> int:
    """Print a library error as its one line; returns the exit status (2 for usage errors)."""
    output.err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
    if isinstance(exc, UsageError):
        return getattr(exc, "exit_code", 2)  # ModalityError: 1
    return 1


def open_store(db: Optional[str], url: Optional[str] = None, *, create: bool, require_table: bool = True):
    """The store ``--url`` or ``--db`` names. Only the commands that load or build (ingest,
    download, init, index create) pass ``create``: the others on a path without a store fail
    with one line naming it, and leave nothing behind, instead of reading a new empty store."""
    from laion_search.errors import StoreError
    from laion_search.api import connect
    from laion_search.store import missing_store_message

    store = connect(url or db, create=create)
    if not create and require_table and not store.has_table():  # a server database without the tables
        store.close()
        raise StoreError(missing_store_message(store.location))
    return store
