"""Run the reliability tests and print the figures the README's "Reliability" section quotes.

    .venv/bin/python scripts/reliability_report.py            # default variant (~6 min on 2 cores)
    LAION_SLOW_TESTS=1 .venv/bin/python scripts/reliability_report.py   # long variant

Every test appends its figures to a JSON-lines file ($LAION_RELIABILITY_REPORT); this script
runs pytest on tests/test_reliability_*.py with that set and sums them up. Seeds are fixed, so
a rerun gives the same kill delays, fuzz cases and requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "figures.jsonl"
        env = {**os.environ, "LAION_RELIABILITY_REPORT": str(report)}
        tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_reliability_*.py"))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, *argv],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        tail = [x for x in proc.stdout.splitlines() if x.strip()][-1:] or ["(no pytest output)"]
        rows = [json.loads(x) for x in report.read_text().splitlines()] if report.exists() else []
    by = lambda name: [r for r in rows if r["test"] == name]  # noqa: E731
    kills = {name: sum(r["kills"] for r in by(name))
             for name in ("ingest", "index create", "ingest --index both", "download --ingest")}
    checks = sum(r.get("checks", 0) for name in kills for r in by(name))
    shard_cases = by("hostile shard")
    rejected = sum(1 for r in shard_cases if not r.get("repair"))
    repaired = sum(1 for r in shard_cases if r.get("repair"))
    query = Counter()
    for r in by("hostile query"):
        query[r["via"]] += r.get("n", 1)
    fuzz_shard = {k: sum(r.get(k, 0) for r in by("shard fuzz")) for k in ("header", "shard", "meta")}
    fuzz_query = {k: sum(r.get(k, 0) for r in by("query fuzz")) for k in ("builder", "roundtrip", "engine")}
    st = by("schemathesis")
    st_requests = sum(r["requests"] for r in st)
    st_5xx = sum(r["5xx"] for r in st)
    conc = by("concurrent ingest")
    conc_ix = by("concurrent index build")
    http_statuses = Counter()
    for r in by("hostile query"):
        for code, n in (r.get("statuses") or {}).items():
            http_statuses[int(code)] += n
    slow = os.environ.get("LAION_SLOW_TESTS", "") not in ("", "0")
    print(f"reliability figures ({'long' if slow else 'default'} variant): pytest {tail[0].strip('= ')}, "
          f"{seconds:.0f} s wall\n")
    print("| what | figure |\n|---|---|")
    print(f"| SIGKILL points survived (ingest / index create / ingest --index both / download --ingest) | "
          f"{kills['ingest']} / {kills['index create']} / {kills['ingest --index both']} / {kills['download --ingest']} "
          f"= **{sum(kills.values())}** |")
    print(f"| invariant checks after kills (whole shards, unique ids, per-shard SHA-256, index) | {checks:,} |")
    print(f"| hostile shard inputs | **{rejected + repaired}**: {rejected} rejected with a specific error, table "
          f"unchanged; {repaired} repaired or accepted as documented |")
    print(f"| hostile queries | **{sum(query.values())}**: Python API {query['python']}, CLI {query['cli']}, "
          f"HTTP {query['http']} (HTTP statuses {dict(sorted(http_statuses.items()))}) |")
    print(f"| hypothesis cases | **{sum(fuzz_shard.values()) + sum(fuzz_query.values()):,}**: .npy headers "
          f"{fuzz_shard['header']}, shards {fuzz_shard['shard']}, metadata schemas {fuzz_shard['meta']}, WHERE "
          f"builder {fuzz_query['builder']}, parameter round trips {fuzz_query['roundtrip']}, searches "
          f"{fuzz_query['engine']} |")
    print(f"| schemathesis requests (OpenAPI, valid + invalid) | **{st_requests:,}**, 5xx: **{st_5xx}** |")
    if conc:
        c = conc[0]
        print(f"| searches during ingest (library threads / HTTP) | {c['searches']} / {c['http']} "
              f"(+{c['counts']} counts), table states seen {c['states']}, errors {c['errors']} |")
    if conc_ix:
        c = conc_ix[0]
        print(f"| searches during index build (exact / indexed) | {c['exact']} / {c['indexed']}, errors {c['errors']} |")
    env_faults = [name for name in ("disk full", "store deleted under server") if by(name)]
    print(f"| environment faults passed | {', '.join(env_faults) or 'none (skipped?)'}, read-only store |")
    if proc.returncode != 0:
        print("\n" + proc.stdout[-4000:])
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
