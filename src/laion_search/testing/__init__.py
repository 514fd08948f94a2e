"""Test fixtures that ship with the package (so a subprocess can run them with ``python -m``).

Nothing here is used by laion-search itself; see :mod:`laion_search.testing.chdb_http`.
"""
