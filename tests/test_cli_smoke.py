"""Every `laion` command and every one of its flags, run through the real CLI at least once.

CASES lists invocations, each with what it must print or do; ``test_every_flag_is_exercised``
fails when a command or flag has no case, so a new flag arrives with its smoke test. Cases run
in-process through typer's runner (one chDB engine, the shared store), in order: later cases use
what earlier ones built. `serve` runs as a real process (it listens); see test_serve_flags.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import numpy as np
import pytest
import typer.main
from typer.testing import CliRunner

from laion_search.cli.main import app

from .conftest import free_port

ROOT_COMMAND = typer.main.get_command(app)


@dataclass
class Case:
    args: str                       # after `laion`; {db} {shards} {tmp} {model} {vec} are filled in
    code: int = 0
    check: Callable[[str, str, Path], object] | None = None  # (stdout, stderr, tmp) -> assert


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _has(*needles: str) -> Callable[[str, str, Path], None]:
    def check(out: str, err: str, tmp: Path) -> None:
        for n in needles:
            assert n in out + err, f"{n!r} not in output:\n{out[-1500:]}\n{err[-1500:]}"
    return check


def _results(n: int, pred: Callable[[dict], bool] = lambda r: True) -> Callable[[str, str, Path], None]:
    def check(out: str, err: str, tmp: Path) -> None:
        rows = json.loads(out)["results"]
        assert len(rows) == n and all(pred(r) for r in rows), rows
    return check


def _mean_similarity(shards: Path) -> float:
    import pyarrow.parquet as pq

    return float(np.mean(pq.read_table(shards / "metadata_0.parquet", columns=["similarity"]).column(0).to_numpy()))


def _indexed(db: Path, names: set[str], *, parts: int) -> bool:
    """Every part of the store at ``db`` carries the indexes ``names`` (and there are ``parts``)."""
    from laion_search import connect

    with connect(db) as store:
        status = {i["name"]: (i["parts_covered"], i["parts"]) for i in store.index_status()}
    assert status == {n: (parts, parts) for n in names}, status
    return True


def _file(rel: str) -> Callable[[str, str, Path], None]:
    def check(out: str, err: str, tmp: Path) -> None:
        assert (tmp / rel).exists(), rel
    return check


CASES: list[Case] = [
    # -- data in
    Case("synth {shards} --shards 0-1 --rows 300 --dim 16 --seed 3 --json",
         check=lambda o, e, t: (t / "shards" / "img_emb_1.npy").exists()),
    Case("synth {tmp}/pics --shards 0 --rows 10 --dim 16 --images",
         check=lambda o, e, t: len(list((t / "pics").rglob("*.jpg"))) == 10),
    Case("synth {tmp}/knobs --shards 0 --rows 400 --dim 32 --intrinsic-dim 8 --decay 0.7 --anisotropy 0.3 "
         "--noise 0.2 --hubs 0.5 --pair-cosine 0.35 --json",
         check=lambda o, e, t: abs(_mean_similarity(t / "knobs") - 0.35) < 0.03),
    Case("synth {tmp}/hard --shards 0 --rows 400 --dim 32 --hard", check=_file("hard/img_emb_0.npy")),
    Case("bench geometry {tmp}/knobs {tmp}/hard --names knobs,hard --rows 400 --sample 40 --out {tmp}/geo --json",
         check=lambda o, e, t: (t / "geo" / "geometry.md").exists() and "knobs" in o),
    Case("bench data real-text --rows 40 --corpus {tmp}/corpus.tsv --seed 1 --out {tmp}/rt --json",
         check=lambda o, e, t: (t / "rt").is_dir() and json.loads(o)),
    Case("bench search --data real-text --corpus {tmp}/corpus.tsv --rows 100 --queries 10 --k 3 --configs 8:32 "
         "--rescoring --no-peers --threads 1 --dir {tmp}/b9 --out {tmp}/b9out --json",
         check=lambda o, e, t: any("hnsw" in r["method"] for r in json.loads(o)["results"])),
    Case("synth {tmp}/folders --shards 7 --rows 20 --dim 16 --layout folders --pad 4",
         check=_file("folders/img_emb/img_emb_0007.npy")),
    Case("ingest {shards} --db {db} --shards 0 --batch-rows 64 --json",
         check=lambda o, e, t: _json_lines(o)[-1]["loaded"] == [0]),
    Case("ingest {shards} --db {db} --force --skip-bad-rows --json",
         check=lambda o, e, t: sorted(_json_lines(o)[-1]["loaded"]) == [0, 1]),
    Case("ingest {tmp}/folders --url {tmp}/folderdb", check=_has("shard 7")),
    Case("ingest {shards} --index both --db {tmp}/idxdb --json",
         check=lambda o, e, t: [x["shard"] for x in _json_lines(o) if x.get("event") == "shard_indexed"] == [0, 1]
         and _indexed(t / "idxdb", {"image_index", "text_index"}, parts=2)),
    Case("ingest {shards} --index sideways --db {tmp}/idxdb2", code=2, check=_has("image, text or both")),
    Case("ingest {tmp}/part.parquet --format clickhouse-parquet --model openai/clip-vit-large-patch14 "
         "--db {tmp}/partdb --json", check=lambda o, e, t: _json_lines(o)[-1]["rows"] == 300),
    Case("ingest {tmp}/emb.h5 --format auto --db {tmp}/sisapdb --json",
         check=lambda o, e, t: _json_lines(o)[-1]["rows"] == 200),
    Case("status --db {db} --json", check=lambda o, e, t: json.loads(o)["rows"] == 600),
    Case("status --url {db}", check=_has("600 rows")),
    Case("sources --json", check=lambda o, e, t: {"laion400m", "laion5b-100m", "sisap-300k"}
         <= {s["name"] for s in json.loads(o)["sources"]}),
    # -- download from a loopback mirror
    Case("download 0-1 --to {tmp}/dl --base-url {mirror} --remote-layout folders --layout folders --pad 0 --jobs 2 "
         "--tries 3 --retry-delay 0.01 --max-retry-delay 0.1 --connect-timeout 5 --read-timeout 5 --no-fsync --json",
         check=lambda o, e, t: _json_lines(o)[-1]["shards_verified"] == [0, 1]
         and (t / "dl" / "img_emb" / "img_emb_1.npy").exists()),
    Case("download 0-1 --to {tmp}/dl2 --base-url {mirror} --ingest --delete-after-ingest --batch-rows 16 "
         "--db {tmp}/dldb --json",
         check=lambda o, e, t: sorted(_json_lines(o)[-1]["ingested"]) == [0, 1] and not (t / "dl2" / "img_emb_0.npy").exists()),
    Case("download 1 --to {tmp}/dl3 --base-url {mirror} --ingest --url {tmp}/dldb2",
         check=lambda o, e, t: (t / "dl3" / "metadata_1.parquet").exists()),
    Case("download 0-1 --to {tmp}/dl5 --base-url {mirror} --ingest --index image --db {tmp}/dldb3 --json",
         check=lambda o, e, t: _indexed(t / "dldb3", {"image_index"}, parts=2)),
    Case("download 1 --to {tmp}/dl6 --base-url {mirror} --index both", code=2, check=_has("--index needs --ingest")),
    Case("download --source laion5b-100m 1 --to {tmp}/dl4 --base-url {mirror} --json",
         check=lambda o, e, t: _json_lines(o)[-1]["shards_verified"] == [1]),
    # -- SQL
    Case("sql 'SELECT count() AS n FROM laion WHERE shard = {s:UInt32}' --param s=1 --db {db} --json",
         check=lambda o, e, t: json.loads(o) == [{"n": 300}]),
    Case("sql 'SELECT id FROM laion ORDER BY id LIMIT 2' --format csv --db {db}",
         check=lambda o, e, t: o.splitlines() == ["id", "0", "1"]),
    Case("sql 'SELECT id FROM laion ORDER BY id LIMIT 1' --format tsv --url {db}", check=_has("id\n0")),
    # -- indexes
    Case("index create --column image --metric cosine --quantization bf16 --m 8 --ef-construction 32 --db {db} --json",
         check=lambda o, e, t: json.loads(o)[0]["index"] == "image_index"),
    Case("index create --column image --m 12 --db {db}", code=2, check=_has("exists with different parameters")),
    Case("index create --column image --quantization i8 --m 12 --replace --db {db}", check=_has("image_index")),
    Case("index tune --recall 0.9 --column image --k 5 --sample 30 --same-modality --seed 1 --dry-run --db {db} --json",
         check=lambda o, e, t: json.loads(o)["met"] and not json.loads(o)["stored"]),
    Case("index tune --recall 0.9 --cross-modal --url {db}", check=_has("ef_search")),
    Case("index tune --recall 0.9 --queries cross-modal --sample 20 --dry-run --db {db} --json",
         check=lambda o, e, t: json.loads(o)["queries"] == 20),
    Case("index tune --queries sideways --db {db}", code=2, check=_has("queries must be one of")),
    Case("index create --column text --guide --url {db} --json",
         check=lambda o, e, t: "64, 256" in json.loads(o)[0]["type"]),
    Case("index create --kind scan --column image --db {db}", check=_has("image_embedding_bf16")),
    Case("index status --db {db} --json",
         check=lambda o, e, t: {"image_index", "text_index", "image_embedding_bf16"} <= {i["name"] for i in json.loads(o)}),
    Case("index status --url {db}", check=_has("text_index", "image_index")),
    # -- search
    Case("search --like 5 --k 3 --db {db} --json", check=_results(3, lambda r: r["id"] != 5)),
    Case("search --vector {vec} --k 2 --exact --metric l2 --modality text --url {db} --json",
         check=_results(2)),
    Case("search --like 5 --k 4 --nsfw exclude --min-similarity 0 --caption-contains a --where shard=1 "
         "--column similarity --column NSFW --exclude-id 1000000001 --db {db} --json",
         check=_results(4, lambda r: r["id"] >= 1_000_000_000 and r["id"] != 1_000_000_001 and "NSFW" in r)),
    Case("search --like 5 --k 5 --ef-search 64 --rescoring --filter-strategy prefilter --fetch-multiplier 8 "
         "--where shard=0 --db {db} --json", check=_results(5, lambda r: r["id"] < 1_000_000_000)),
    Case("search --like 5 --k 3 --exact --verify-checksums --scan-threads 1 --scan-nice 5 --db {db} --json", check=_results(3)),
    Case("search --text 'a photo of a dog' --model {model} --k 3 --db {db} --json", check=_results(3)),
    Case("search --image {tmp}/img.png --model {model} --k 2 --exact --db {db}", check=_has("2 results")),
    Case("search --like 5 --filter-strategy sideways --db {db}", code=2, check=_has("filter strategy")),
    Case("index drop --column text --db {db} --json", check=lambda o, e, t: json.loads(o) == {"text_index": True}),
    Case("index drop --column image --kind scan --url {db}", check=_has("image_embedding_bf16")),
    # -- CLIP: embed images, UDFs
    Case("embed {tmp}/images {tmp}/embedded --model {model} --shard-size 2 --batch-size 1 --from-filenames --json",
         check=lambda o, e, t: (t / "embedded" / "metadata_1.parquet").exists()),
    Case("embed {tmp}/images {tmp}/embedded2 --model {model} --captions {tmp}/captions.csv",
         check=_file("embedded2/img_emb_0.npy")),
    Case("udf install --dir {tmp}/udf --model {model} --python " + shlex.quote(sys.executable)
         + " --pool-size 1 --json", check=_file("udf/encode_text_function.xml")),
    Case("udf install --db {db} --model {model} --pool-size 1", check=lambda o, e, t: (t / "db" / "udf").is_dir()),
    Case("udf install --url clickhouse://u:p@127.0.0.1:1/db --model {model}", code=2,
         check=_has("must be copied into the server's config")),
    # -- cluster DDL and planning
    Case("init --cluster c1 --shards-by hash --replicated --dry-run --json",
         check=lambda o, e, t: any("ReplicatedMergeTree" in s for s in json.loads(o)["statements"])),
    Case("init --db {tmp}/fresh --json", check=lambda o, e, t: (t / "fresh").is_dir()),
    Case("init --url {tmp}/fresh2 --cluster c1 --shards-by modulo --dry-run", check=_has("ON CLUSTER")),
    Case("plan --rows 100M --nodes 3 --dim 768 --cores 16 --ram-gib 64 --disk-tib 2 --storage f32-lz4 --quantization i8 "
         "--m 32 --ef-construction 128 --indexes 1 --replicas 2 --json", check=lambda o, e, t: json.loads(o)["inputs"]),
    # -- demo and benchmarks, at toy sizes
    Case("demo --dir {tmp}/demo --rows 300 --shards 2", check=_has("more like")),
    Case("bench ingest --rows 2000 --formats clickhouse-parquet,sisap-h5 --dir {tmp}/b0 --json",
         check=lambda o, e, t: json.loads(o)),
    Case("bench ingest --rows 2000 --guide-rows 200 --dir {tmp}/b1 --out {tmp}/b1out --json",
         check=lambda o, e, t: json.loads(o)["results"]),
    Case("bench search --rows 1500 --queries 20 --k 5 --configs 8:32 --quantization bf16 --metric cosine "
         "--threads 1 --dir {tmp}/b2 --out {tmp}/b2out --json",
         check=lambda o, e, t: (t / "b2out" / "bench-search.md").exists()),
    Case("bench search --db {db} --queries {tmp}/q.npy --gold {tmp}/gold.npy --limit 5 --k 5 --out {tmp}/b3out",
         check=_has("recall@10")),
    Case("bench search --url {db} --queries {tmp}/q.npy --gold {tmp}/gold.npy --limit 3 --k 5 --out {tmp}/b4out",
         check=_has("recall@30")),
    Case("bench clip --rows 200 --model {model} --repeat 3 --images 2 --dir {tmp}/b5 --json",
         check=lambda o, e, t: json.loads(o)["encode_ms"] > 0),
    Case("bench serve --rows 500 --clients 1 --seconds 1 --dir {tmp}/b7 --json",
         check=lambda o, e, t: json.loads(o)["requests"] > 0),
    Case("bench serve --db {tmp}/b7/db --kinds indexed --clients 2 --seconds 1 --json",
         check=lambda o, e, t: json.loads(o)["kinds"] == ["indexed"] and json.loads(o)["errors"] == 0),
    Case("bench serve --kinds indexed,bogus --seconds 1", code=2, check=_has("--kinds: choose from")),
    Case("bench serve --mixed --rows 500 --scan-clients 1 --rate 5 --seconds 1 --server-arg=--max-scans=2 "
         "--dir {tmp}/b8 --json", check=lambda o, e, t: json.loads(o)),
    Case("bench pipeline --rows 1000 --modes on-ingest --build-threads 1 --m 8 --ef-construction 32 --quantization bf16 "
         "--queries 5 --guide-rows 300 --dir {tmp}/b10 --out {tmp}/b10.md --json",
         check=lambda o, e, t: {r["method"] for r in json.loads(o)["results"]} == {"on-ingest", "usearch", "guide"}
         and "fastest:" in (t / "b10.md").read_text()),
    Case("bench pipeline --rows 1000 --modes after --no-peers --dir {tmp}/b10", check=_has("index create --column both")),
    Case("bench pipeline --rows 1000 --modes sideways", code=2, check=_has("--modes takes after, on-ingest")),
    Case("bench download --shards 1 --rows 100 --rate 50 --repeat 1 --unthrottled --dir {tmp}/b6 --out {tmp}/b6out "
         "--json", check=lambda o, e, t: json.loads(o)["results"]),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from PIL import Image

    from laion_search.clip.tiny import make_clip_model

    tmp = tmp_path_factory.mktemp("smoke")
    model = make_clip_model(tmp / "tiny", "tiny")  # 16-d, as the shards below
    rng = np.random.default_rng(0)
    np.save(tmp / "vec.npy", rng.standard_normal(16).astype(np.float32))
    (tmp / "images").mkdir()
    for i, name in enumerate(["red_car.png", "blue_house.jpg", "dog.png"]):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp / "images" / name)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp / "img.png")
    words = ["fast", "vector", "search", "image", "text", "index", "graph", "embedding", "model", "table",
             "query", "cluster", "engine", "library", "tool", "data", "file", "stream", "server", "client"]
    lines = [f"pkg{i}\t{' '.join(rng.choice(words, 6))} for {words[i % 20]} work" for i in range(80)]
    (tmp / "corpus.tsv").write_text("name\tsummary\n" + "\n".join(lines) + "\n")
    (tmp / "captions.csv").write_text("image_path,caption\nred_car.png,a red car\ndog.png,a dog\n")
    # a loopback mirror: LAION shards in folders, and a ClickHouse LAION-5B part
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laion_search.sources.synth import synth
    from laion_search.testing.faulty_http import FaultyServer

    synth(tmp / "mirror", [0, 1], 50, dim=16, seed=2, layout="folders")
    from laion_search.sources.synth import synth_clickhouse_parquet, synth_sisap_h5

    synth_clickhouse_parquet(tmp / "part.parquet", 300, dim=32, seed=4)
    synth_sisap_h5(tmp / "emb.h5", 200, dim=32, seed=5)
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.uint32()), "vector": [[0.1] * 4, [0.2] * 4]}),
                   tmp / "mirror" / "laion5b_100m_part_1_of_10.parquet")
    with FaultyServer(tmp / "mirror") as mirror:
        # queries and a gold standard for `bench search --queries/--gold` are computed once the store exists
        yield {"tmp": tmp, "model": str(model), "db": str(tmp / "db"), "shards": str(tmp / "shards"),
               "vec": str(tmp / "vec.npy"), "mirror": mirror.url}


def _gold(world) -> None:
    """Queries = stored vectors (ids 5, 6, 7, ...), gold = exact cosine neighbours (1-based ids
    would be SISAP's; ours are the table's ids), written as .npy."""
    from laion_search import connect

    tmp = world["tmp"]
    if (tmp / "gold.npy").exists():
        return
    with connect(world["db"]) as db:
        rows = db.rows("SELECT id, image_embedding AS v FROM laion ORDER BY id")
    ids = np.array([r["id"] for r in rows])
    x = np.array([r["v"] for r in rows], np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[5:15]
    order = np.argsort(-(q @ x.T), axis=1)[:, :30]
    np.save(tmp / "q.npy", q)
    np.save(tmp / "gold.npy", ids[order].astype(np.int64))


def _fill(args: str, world) -> list[str]:
    return shlex.split(args.format(**{k: shlex.quote(str(v)) for k, v in world.items()}))


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c.args.split(" --")[0][:40] for c in CASES])
def test_case(i, world):
    case = CASES[i]
    if "--gold" in case.args:
        _gold(world)
    argv = _fill(case.args.replace("{s:UInt32}", "{{s:UInt32}}"), world)
    # caches (real-text) go under the test's folder, not the user's; tables as wide as they need
    env = {"XDG_CACHE_HOME": str(world["tmp"] / "cache"), "HOME": str(world["tmp"] / "home"), "COLUMNS": "400"}
    from laion_search.cli import output

    for name in ("out", "err"):  # the consoles are made on first use: make them for this environment
        output.__dict__.pop(name, None)
    result = CliRunner().invoke(app, argv, catch_exceptions=False, env=env)
    out, err = result.stdout, result.stderr
    assert result.exit_code == case.code, f"laion {' '.join(argv)} → {result.exit_code}\n{out[-2000:]}\n{err[-2000:]}"
    assert "Traceback" not in out + err
    if case.check is not None:
        assert case.check(out, err, world["tmp"]) is not False, f"laion {' '.join(argv)}:\n{out[-2000:]}"


SERVE = "serve --host 127.0.0.1 --port {port} --token s3cret --model {model} --allow-sql --allow-image-url " \
        "--cors-origin http://example.test --query-timeout 10 --images {images} --cache-size 16 --max-scans 2 " \
        "--scan-queue 4 --scan-threads 1 --scan-nice 10 --log-level warning --db {db}"
SERVE_URL = "serve --url {db} --port {port}"


def test_serve_flags(world, tmp_path):
    """`laion serve` with every flag, as a real process: each flag's effect is checked."""
    import time

    from laion_search.sources.synth import synth

    synth(tmp_path / "s", [0], 100, dim=16, seed=1, images=True)
    db = tmp_path / "db"
    assert CliRunner().invoke(app, ["ingest", str(tmp_path / "s"), "--db", str(db)]).exit_code == 0
    port = free_port()
    argv = shlex.split(SERVE.format(port=port, model=shlex.quote(world["model"]), db=shlex.quote(str(db)),
                                    images=shlex.quote(str(tmp_path / "s"))))
    proc = subprocess.Popen([sys.executable, "-m", "laion_search.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(timeout=300)  # a busy machine is slow; a hang would still fail the suite's timeout
    try:
        deadline = time.monotonic() + 120  # a failure timeout for start-up, not a measurement
        while True:
            try:
                if http.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
        auth = {"Authorization": "Bearer s3cret"}
        assert http.get(base + "/api/status").status_code == 401                      # --token
        st = http.get(base + "/api/status", headers=auth).json()
        assert st["rows"] == 100 and st["local_images"]                                # --images
        assert st["admission"]["scan_threads"] == 1                                    # --scan-threads
        assert st["admission"]["scan_nice"] == 10                                      # --scan-nice
        gate = st["admission"]["exact_scan"]
        assert (gate["max_running"], gate["max_queue"]) == (2, 4), gate                  # --max-scans, --scan-queue
        first = http.post(base + "/api/search", json={"like": 3, "k": 2}, headers=auth).json()
        again = http.post(base + "/api/search", json={"like": 3, "k": 2}, headers=auth).json()
        assert (first["cached"], again["cached"]) == (False, True)                     # --cache-size
        url = http.post(base + "/api/sql", json={"query": "SELECT url FROM laion LIMIT 1"}, headers=auth).json()
        assert "rows" in url, url
        pic = http.get(base + "/local/" + url["rows"][0]["url"], headers=auth)
        assert pic.status_code == 200 and pic.content[:2] == b"\xff\xd8"             # a JPEG, same-origin
        # the server loads its CLIP model in the background: await that event (the status says when
        # it is done), not a clock; on a busy machine it can take longer than a request waits for it
        while http.get(base + "/api/status", headers=auth).json()["encoder"]["state"] == "checking":
            assert proc.poll() is None and time.monotonic() < deadline + 600, "the CLIP model never loaded"
            time.sleep(0.2)
        r = http.post(base + "/api/search", json={"text": "a dog", "k": 2}, headers=auth)  # --model
        assert r.status_code == 200 and len(r.json()["results"]) == 2
        r = http.post(base + "/api/sql", json={"query": "SELECT count() AS n FROM laion"}, headers=auth)
        assert r.json()["rows"] == [{"n": 100}]                                           # --allow-sql
        r = http.options(base + "/api/search", headers={"Origin": "http://example.test",
                                                         "Access-Control-Request-Method": "POST"})
        assert r.headers.get("access-control-allow-origin") == "http://example.test"     # --cors-origin
        r = http.post(base + "/knn-service", json={"image_url": "http://127.0.0.1:1/x.png", "num_images": 2},
                       headers=auth)
        assert "disabled" not in r.text                                                  # --allow-image-url
        r = http.post(base + "/api/sql", headers=auth,
                       json={"query": "SELECT count() FROM numbers(1000000000000) WHERE sleepEachRow(0) = 0"})
        assert r.status_code == 400 and "TIMEOUT_EXCEEDED" in r.text.upper().replace(" ", "_"), r.text  # --query-timeout
    finally:
        http.close()
        proc.terminate()
        proc.wait(timeout=60)


def _used_options() -> dict[tuple[str, ...], set[str]]:
    used: dict[tuple[str, ...], set[str]] = {}
    for text in [c.args for c in CASES] + [SERVE, SERVE_URL]:
        words = shlex.split(text.replace("{", "").replace("}", ""))
        path, cmd = [], ROOT_COMMAND
        while words and getattr(cmd, "commands", None) and words[0] in cmd.commands:
            path.append(words[0])
            cmd = cmd.commands[words.pop(0)]
        used.setdefault(tuple(path), set()).update(w.split("=")[0] for w in words if w.startswith("-"))
    return used


aliases: dict[str, str] = {}  # every spelling of an option (-k, --no-peers) → its first name


def _all_options() -> dict[tuple[str, ...], set[str]]:
    out: dict[tuple[str, ...], set[str]] = {}

    def walk(cmd, path):
        if getattr(cmd, "commands", None):
            for name, sub in cmd.commands.items():
                walk(sub, path + (name,))
            return
        out[path] = {o.opts[0] for o in cmd.params if o.param_type_name == "option"} - {"--help"}
        aliases.update({alt: o.opts[0] for o in cmd.params if o.param_type_name == "option"
                        for alt in [*o.opts, *o.secondary_opts]})

    walk(ROOT_COMMAND, ())
    return out


def test_every_flag_is_exercised():
    every = _all_options()
    used = {p: {aliases.get(o, o) for o in opts} for p, opts in _used_options().items()}
    missing = {" ".join(p): sorted(opts - used.get(p, set())) for p, opts in every.items()}
    missing = {k: v for k, v in missing.items() if v or k.split()[0] not in {" ".join(p).split()[0] for p in used}}
    assert not {k: v for k, v in missing.items() if v}, f"commands/flags without a smoke case: {missing}"
    assert set(every) <= set(used) | {("serve",)}, sorted(set(every) - set(used))
