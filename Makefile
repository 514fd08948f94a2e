# Two commands on a fresh machine: `make demo` and `make test` (and `make docs` for the documentation site).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# torch is pinned to the CPU build this machine carries; never let a bare `torch` resolve.
STAMP_RUN  := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test
STAMP_DOCS := $(VENV)/.installed-docs

.PHONY: demo test install install-test bench clean reliability docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first, pinned: the [clip] extra's range is then already satisfied and pip pulls nothing bigger.
TORCH := torch==2.13.0

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[clip,server]'
	touch $@

$(STAMP_TEST): pyproject.toml | $(BIN)/python
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[clip,server,test,bench]'
	# clip-retrieval's own ClipClient for the compatibility tests; --no-deps: its server's stack
	# (flask, faiss, open_clip, …) is not needed to use the client
	$(PIP) install --quiet --no-deps clip-retrieval==2.45.0
	touch $@ $(STAMP_RUN)

# The docs need only the package (for the CLI reference script) and mkdocs: no torch.
$(STAMP_DOCS): pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[docs]'
	touch $@

install: $(STAMP_RUN)
install-test: $(STAMP_TEST)

demo: $(STAMP_RUN)
	$(BIN)/laion demo --dir laion-demo

# Browser tests drive Debian's chromium through Playwright (never a downloaded browser).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# Two workers; --dist loadfile keeps each file on one worker (the CLI smoke cases run in order).
test: $(STAMP_TEST) $(CHROMIUM)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The README's reliability figures (kill points, hostile inputs, fuzz cases, 5xx); LAION_SLOW_TESTS=1 for the long variant.
reliability: $(STAMP_TEST)
	$(BIN)/python scripts/reliability_report.py

# The documentation site (README.md is the front page; the pages are docs/*.md) into site/.
docs: $(STAMP_DOCS)
	$(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP_TEST)
	$(BIN)/laion bench ingest --rows 1000000 --guide-rows 50000

clean:
	rm -rf $(VENV) laion-demo bench-out .pytest_cache site
