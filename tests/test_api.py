"""The object API: connect → ingest / search / create_index / drop_index / status, typed results."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

import laion_search
from laion_search import Database, Filters, SearchQuery, SearchResult, StoreStatus, UsageError, connect
from laion_search.sources.synth import synth


def test_exports_are_exact():
    assert sorted(laion_search.__all__) == sorted([
        "connect", "Database", "SearchQuery", "SearchResult", "Filters", "SearchOptions", "IngestReport",
        "IndexBuild", "StoreStatus", "ShardStatus", "IndexInfo", "LaionError", "UsageError", "ShardError",
        "ShardValidationError", "StoreError", "StoreBusyError", "QueryError", "EncoderError", "ModalityError",
        "EncoderUnavailable", "DownloadError", "Overloaded", "ShuttingDown", "ServeError", "__version__"])
    for name in laion_search.__all__:
        assert getattr(laion_search, name) is not None, name
    assert type(laion_search) is type(dataclasses)  # a plain module, no class swap
    with pytest.raises(AttributeError):
        laion_search.no_such_name  # noqa: B018


def test_connect_ingest_index_search_status(tmp_path):
    synth(tmp_path / "shards", [0, 1], 300, dim=32, seed=3)
    with connect(tmp_path / "db") as db:
        assert isinstance(db, Database)
        report = db.ingest(tmp_path / "shards")
        assert report.loaded == [0, 1] and report.rows == 600
        built = db.create_index("image", m=8, ef_construction=32)
        assert built.index == "image_index" and built.rows == 600 and "vector_similarity" in built.type
        st = db.status()
        assert isinstance(st, StoreStatus) and st.rows == 600 and st.dim == 32
        assert [s.shard for s in st.shards] == [0, 1] and all(s.state == "loaded" for s in st.shards)
        assert [i.name for i in st.indexes] == ["image_index"] and st.indexes[0].parts_covered == st.indexes[0].parts
        assert st.as_dict()["shards"][0]["rows"] == 300

        by_kw = db.search(like=7, k=5, exact=True, nsfw="exclude")
        by_query = db.search(SearchQuery(like=7, k=5, exact=True, nsfw="exclude"))
        assert isinstance(by_kw, SearchResult) and len(by_kw) == 5
        assert [r["id"] for r in by_kw] == [r["id"] for r in by_query]
        rows = list(by_kw)
        assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5] and rows[0] is by_kw[0]
        assert all(r["distance"] <= s["distance"] for r, s in zip(rows, rows[1:]))
        with pytest.raises(UsageError, match="not both"):
            db.search(SearchQuery(like=7), k=3)

        v = np.asarray(db.rows("SELECT image_embedding FROM laion WHERE id = 7")[0]["image_embedding"], np.float32)
        assert db.search(vector=v, k=1, exact=True)[0]["id"] == 7
        filt = db.search(vector=v, k=3, exact=True, filters=Filters(exclude_ids=[7]))
        assert 7 not in [r["id"] for r in filt]

        assert db.drop_index("image") is True and db.drop_index("image") is False
        assert db.status().indexes == []
        db.create_index("image", kind="scan")
        assert [i.name for i in db.status().indexes] == ["image_embedding_bf16"]
        assert db.drop_index("image", kind="scan") is True
        with pytest.raises(UsageError, match="kind must be"):
            db.create_index("image", kind="pq")
        built = db.create_index("image", kind="ivf", lists=4)
        assert built.index == "laion_ivf_image_g1" and built.rows == 600 and built.type.startswith("ivf(lists=4")
        assert db.search(like=7, k=5).strategy == "ivf (nprobe 4)"
        assert [s["lists"] for s in db.ivf_status()] == [4]
        assert db.drop_index("image", kind="ivf") is True and db.ivf_status() == []


def test_search_query_checks_once_with_one_line_reasons():
    with pytest.raises(UsageError, match="exactly one query"):
        SearchQuery(text="a", like=3).check()
    with pytest.raises(UsageError, match="k must be between"):
        SearchQuery(like=1, k=0).check()
    with pytest.raises(UsageError, match="modality"):
        SearchQuery(like=1, modality="audio").check()
    with pytest.raises(UsageError, match="fetch_multiplier"):
        SearchQuery(like=1, fetch_multiplier=0.5).check()
    with pytest.raises(UsageError, match="--where"):
        SearchQuery(like=1, where=["nocolumn=1"]).check()
    q = SearchQuery.build(None, filters=Filters(nsfw="exclude"), like=4)
    assert q.nsfw == "exclude" and q.filters.nsfw == "exclude" and q.options.fetch_multiplier == 4.0


def test_one_query_model_everywhere():
    """Every SearchQuery field is a `laion search` option and an /api/search field (the model is
    the server's --model and --scan-threads over HTTP), so a knob cannot exist on one side only."""
    import typer.main

    from laion_search.cli.main import app
    from laion_search.web.app import HTTP_ONLY, SERVER_SIDE, SearchBody

    fields = {f.name for f in dataclasses.fields(SearchQuery)}
    command = typer.main.get_command(app).commands["search"]  # type: ignore[attr-defined]
    cli = {p.name for p in command.params} - {"db", "url", "json_output"}
    assert cli == fields
    assert set(SearchBody.model_fields) - HTTP_ONLY == fields - SERVER_SIDE
    assert SERVER_SIDE == {"model", "scan_threads", "scan_nice"} and HTTP_ONLY == {"image_url"}  # the server fetches


def test_faces_take_defaults_bounds_and_choices_from_the_model():
    """Not only the names: each `laion search` option and each /api/search field has the model's
    default, its bounds and its choices (a default changed in the model changes every face), and
    GET /api/search/fields (the page's source) says the same."""
    import typer.main

    from laion_search.cli.main import app
    from laion_search.query import describe_query, query_fields
    from laion_search.web.app import SearchBody

    command = typer.main.get_command(app).commands["search"]  # type: ignore[attr-defined]
    cli = {p.name: p for p in command.params}
    schema = SearchBody.model_json_schema()["properties"]
    described = {d["name"]: d for d in describe_query()}
    for f in query_fields():
        kb = f.metadata["knob"]
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        if f.name != "model":  # --model is the option every CLIP command shares ($LAION_CLIP_MODEL)
            assert (cli[f.name].default or None) == (default or None), f.name
            assert kb.help.split(".")[0] in (cli[f.name].help or ""), f.name
            if kb.choices and f.name != "columns":
                assert ", ".join(kb.choices) in cli[f.name].help, f.name
        if kb.server_side:
            assert f.name not in schema and f.name not in described
            continue
        prop = schema[f.name]
        assert prop.get("default", None if not isinstance(default, list) else []) == default, f.name
        assert prop["description"] == kb.help == described[f.name]["help"]
        assert described[f.name]["default"] == default
        if kb.choices:
            enum = prop.get("enum") or prop.get("items", {}).get("enum")
            assert enum == list(kb.choices) == described[f.name]["choices"], f.name
        if kb.ge is not None and f.name not in ("like", "exclude_ids"):
            assert prop["minimum"] == kb.ge == described[f.name]["minimum"], f.name
        if kb.le is not None and f.name not in ("like", "exclude_ids"):
            assert prop["maximum"] == kb.le == described[f.name]["maximum"], f.name


def test_check_enforces_the_models_bounds_and_choices():
    """check() reads the bounds and choices from the fields' metadata: every bounded field refuses
    one past each bound with its own name in the message, every choice field an unknown value."""
    from laion_search.query import query_fields

    for f in query_fields():
        kb = f.metadata["knob"]
        base = {"like": 1} if f.name != "like" else {}
        if kb.choices and f.name != "columns":
            with pytest.raises(UsageError, match=f"{kb.label or f.name} must be one of"):
                SearchQuery(**base, **{f.name: "sideways"}).check()
        for bound, step in ((kb.ge, -1), (kb.le, 1)):
            if bound is None:
                continue
            value = bound + step
            value = [int(value)] if f.name == "exclude_ids" else (int(value) if isinstance(bound, int) else value)
            with pytest.raises(UsageError, match=re.escape(kb.label or f.name)):
                SearchQuery(**base, **{f.name: value}).check()
            ok = [int(bound)] if f.name == "exclude_ids" else bound
            SearchQuery(**base, **{f.name: ok}).check()  # the bound itself is allowed
