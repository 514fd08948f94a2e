#!/usr/bin/env bash
# `make test` three times in a row, each from a fresh clone of one commit, while two busy loops
# hold both cores (the acceptance check for the suite's time under load).
#   scripts/make_test_under_load.sh [COMMIT]     (default: HEAD) → one line per run in /tmp/busy3.summary
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
SHA=$(git -C "$REPO" rev-parse "${1:-HEAD}")
python3 -c 'while 1: pass' & B1=$!
python3 -c 'while 1: pass' & B2=$!
trap 'kill $B1 $B2 2>/dev/null' EXIT
for i in 1 2 3; do
  rm -rf "/tmp/busy$i"; git clone -q "$REPO" "/tmp/busy$i"
  cd "/tmp/busy$i" && git checkout -q "$SHA"
  start=$(date +%s)
  make test > "/tmp/busy$i.log" 2>&1; rc=$?
  end=$(date +%s)
  echo "run $i ($SHA): rc=$rc, $((end-start)) s, $(tail -1 "/tmp/busy$i.log")" | tee -a /tmp/busy3.summary
  cd /
done
