"""Engines behind the one :class:`Backend` boundary: embedded chDB (:mod:`.chdb`), a ClickHouse
server or cluster (:mod:`.server`, :mod:`.cluster`); :mod:`.base` holds the boundary itself."""

from laion_search.backends.base import Backend, Params, clean_engine_message, format_param, settings_sql
from laion_search.backends.chdb import MAX_SESSIONS, ChdbBackend, read_owner
from laion_search.backends.server import ClickHouseBackend, is_url, parse_url, redact_url

__all__ = ["Backend", "Params", "clean_engine_message", "format_param", "settings_sql", "MAX_SESSIONS",
           "ChdbBackend", "read_owner", "ClickHouseBackend", "is_url", "parse_url", "redact_url"]
