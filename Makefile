# imgproc: `make run` serves the API, `make test` runs the whole suite, `make check` is CI.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8000

NEWMAN := tests/tools/node_modules/.bin/newman

.PHONY: run test test-tools browser chaos bench bench-quality bench-load lint fmt typecheck check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime-deps: requirements.txt | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

$(VENV)/.dev-deps: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@ $(VENV)/.runtime-deps

run: $(VENV)/.runtime-deps  ## serve on 127.0.0.1:$(PORT) (embedded MongoDB unless MONGODB_URI)
	PORT=$(PORT) exec $(BIN)/python -m imgproc serve

test: $(VENV)/.dev-deps test-tools  ## the whole suite (own database server, image host, webhook receiver, browser, newman)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-tools: browser $(NEWMAN)  ## what the suite drives besides Python: Debian's Chromium and newman

browser:  ## Debian's Chromium for the dashboard tests (apt-get, as root or through sudo)
	tests/tools/install-browser.sh

$(NEWMAN): tests/tools/package.json tests/tools/package-lock.json
	npm ci --prefix tests/tools --no-audit --no-fund --loglevel=error
	touch $@

SEEDS ?= 50
FIRST ?= 1
chaos: $(VENV)/.dev-deps  ## SEEDS seeded chaos runs per storage backend (from FIRST): make chaos SEEDS=50
	IMGPROC_CHAOS_SEEDS=$(FIRST)-$$(( $(FIRST) + $(SEEDS) - 1 )) \
		$(BIN)/python -m pytest tests/test_chaos.py -p no:cacheprovider -q $(PYTEST_ARGS)

bench: $(VENV)/.dev-deps  ## throughput vs the compress-only ceiling at origin latencies 0, 0.3, 1 s; a table and a JSON line
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

bench-load: $(VENV)/.dev-deps  ## 20 concurrent uploads x 50 images while 50 status polls/s run for a minute
	$(BIN)/python bench/load.py $(BENCH_ARGS)

bench-quality: $(VENV)/.dev-deps  ## encoder settings: bytes, SSIM and time over real photographs
	$(BIN)/python bench/quality.py $(BENCH_ARGS)

lint: $(VENV)/.dev-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(VENV)/.dev-deps
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(VENV)/.dev-deps
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache tests/tools/node_modules test-artifacts
