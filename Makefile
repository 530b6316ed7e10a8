# podvm: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= /usr/bin/python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: test deps lint unit manifests images demo demo-down bench plan clean

## test: install what is missing, lint, type-check, then run every test tier (needs root)
test: deps lint
	$(BIN)/pytest tests

## deps: Debian packages, the Python virtual environment and the browser console's client libraries
# The bytecode is compiled as pip compiles it into the images: without it, every runner a test or benchmark starts
# would compile its modules again (about 50 ms a start), and the start figures would not be the images'.
deps: $(VENV)/.installed node_modules/.package-lock.json
	./scripts/install-system-deps
	$(BIN)/python -m compileall -q shared netsidecar vmrunner

# Exact versions and integrity hashes from package-lock.json; no install scripts run.
node_modules/.package-lock.json: package.json package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund

$(VENV)/.installed: pyproject.toml
	./scripts/install-system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# compat: the checkout goes on sys.path by a plain .pth line; the default import hook costs every Python
	# process about 10 ms at start (it loads importlib.metadata), which the images do not pay.
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $@

## lint: style, types and the layering of the packages
lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## unit: the fast tier only (no root needed)
unit: deps
	$(BIN)/pytest tests/unit

## manifests: render the plain manifests in deploy/ from the Helm chart (tests/unit/test_chart.py fails when stale)
manifests: deps
	$(BIN)/python scripts/manifests.py

## images: build the two container images with podman (on a local Debian base when no registry is reachable)
images: deps
	./scripts/podman/build-images

## demo: as root, from nothing to a VM on a pod IP: packages, images, a demo guest, the pod (Ctrl-C stops it)
demo:
	./scripts/demo

## demo-down: shut the demo VM down through ACPI and remove its pod (images and the VM's disk are kept)
demo-down:
	./scripts/demo down

## bench: as root, every benchmark on the namespace test bed: one table, JSON in bench/results/latest.json
bench: deps
	$(BIN)/python bench/suite.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache build node_modules *.egg-info .pytest_cache .mypy_cache .ruff_cache
