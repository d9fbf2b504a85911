# edgecache: `make up` starts the local multi-region stack, `make test` runs every test.
# Both create .venv and install on a fresh machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TOPOLOGY ?= deploy/local.toml

.PHONY: up test deploy-check bench bench-tools lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build on this machine's disk (unpinned, pip takes a CUDA build)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,bench,semantic]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(VENV)/bin/edgecache up --topology $(TOPOLOGY)

test: $(STAMP) deploy-check
	$(PY) -m pytest -q

# deploy/: compose, Kubernetes overlays, topologies, Dockerfile and NATS configs, checked
# offline (Docker cannot run here): docs/deploy.md.
deploy-check: $(STAMP)
	$(PY) deploy/check

bench: $(STAMP) bench-tools
	mkdir -p bench/out
	$(PY) -m bench.hit_path --quick --json bench/out/hit_path.json
	$(PY) -m bench.prefix_routing --quick --json bench/out/prefix_routing.json
	$(PY) -m bench.semantic_eval --quick --json bench/out/semantic_eval.json
	$(PY) -m bench.semantic_index --quick --json bench/out/semantic_index.json
	$(PY) -m bench.semantic_latency --quick --json bench/out/semantic_latency.json
	$(PY) -m bench.invalidation --quick --json bench/out/invalidation.json
	$(PY) -m bench.e2e --quick --json bench/out/e2e.json

# wrk (Debian package) measures the hit path; without it the benchmarks fall back to an
# aiohttp load generator and say so. Best effort: needs root and Debian's apt.
bench-tools:
	@command -v wrk >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get install -y -q wrk >/dev/null 2>&1 && echo "installed wrk"; } || \
		echo "wrk not installed: benchmarks use the aiohttp load generator"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) var bench/out
