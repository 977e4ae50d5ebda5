# Sluice: every target builds what it needs first, so a fresh clone needs no other step.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODELS_STAMP := models/.built

.PHONY: serve test check models bench bench-serving bench-wrk bench-telemetry bench-batch bench-workers bench-rollout clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -m compileall -q server  # as pip compiles an installed package
	touch $(STAMP)

# Rebuilt whenever the training code or a model.yaml changes; byte-identical on rebuild.
$(MODELS_STAMP): $(STAMP) $(wildcard models/*.py) $(wildcard models/*/model.yaml)
	$(BIN)/python -m models.train --repository models
	touch $(MODELS_STAMP)

models: $(MODELS_STAMP)

serve: $(MODELS_STAMP)
	$(BIN)/sluice serve --model-repository models

test: $(MODELS_STAMP)
	$(BIN)/python -m pytest -q

check: $(STAMP)
	$(BIN)/ruff format --check server loadtest tests models
	$(BIN)/ruff check server loadtest tests models
	$(BIN)/mypy

# Every benchmark, each writing its README table (about 30 minutes in all).
bench: bench-serving bench-wrk bench-telemetry bench-batch bench-rollout bench-workers

# Serving (about 15 minutes; installs MLServer into .bench/ on first use).
bench-serving: $(MODELS_STAMP)
	$(BIN)/python -m loadtest.benchmarks.serving --write-readme

# The harness against wrk (Debian package `wrk`), about 3 minutes.
bench-wrk: $(MODELS_STAMP)
	$(BIN)/python -m loadtest.benchmarks.wrk_check --write-readme

bench-telemetry: $(MODELS_STAMP)
	$(BIN)/python -m loadtest.benchmarks.telemetry_bench --write-readme

# Client latency during reloads and with a shadow, against neither (about 6 minutes).
bench-rollout: $(MODELS_STAMP)
	$(BIN)/python -m loadtest.benchmarks.rollout_bench --write-readme

# sluice batch against a hand-written script on 1 M rows, then rows/s (about 3 minutes).
bench-batch: $(MODELS_STAMP)
	$(BIN)/python -m loadtest.benchmarks.batch_bench --write-readme

# One process against --workers 2, pinned and sharing the cores (about 5 minutes).
bench-workers: $(MODELS_STAMP)
	$(BIN)/python -m loadtest.benchmarks.workers_bench --write-readme

clean:
	rm -rf $(VENV) models/*/[0-9]*/ $(MODELS_STAMP)
