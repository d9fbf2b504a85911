# edgecache: `make up` starts the local multi-region stack, `make test` runs every test.
# Both create .venv and install on a fresh machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TOPOLOGY ?= deploy/local.toml

.PHONY: up test bench lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(VENV)/bin/edgecache up --topology $(TOPOLOGY)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	mkdir -p bench/out
	$(PY) -m bench.hit_path --quick --json bench/out/hit_path.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) var bench/out
