# The two commands a newcomer needs: `make demo` and `make test`. Everything else is a step of those.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: test demo servers lint unit integration bench soak clean

# Runs the whole suite: lint, types, unit and integration tests against real OPA, etcd and kube-apiserver.
test: $(STAMP) servers lint
	$(PY) -m pytest

# Brings up etcd, kube-apiserver, OPA and kopa on loopback, in the foreground; Ctrl-C tears it all down.
demo: $(STAMP) servers
	$(PY) -m devstack.demo $(DEMO_ARGS)

# Builds (once per version, cached in ~/.cache/kopa/tools) the real servers the tests and the demo run,
# and helm and kube-score for the chart's tests.
servers:
	scripts/build-servers.sh opa kube helm kube-score

lint: $(STAMP)
	$(VENV)/bin/ruff check app tests devstack bench
	$(VENV)/bin/ruff format --check app tests devstack bench
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest tests/unit

integration: $(STAMP) servers
	$(PY) -m pytest tests/integration

# The benchmarks (docs/benchmarks.md) against local etcd, kube-apiserver and OPA, and Go kube-mgmt beside kopa when
# `scripts/build-servers.sh kube-mgmt` built it: about 35 minutes on 2 cores with kube-mgmt (measured; less without it).
# Writes docs/benchmarks.json, docs/benchmarks/*.png and the figures in docs/benchmarks.md.
# BENCH_ARGS passes options (see `python -m bench --help`); BENCH_ARGS=--quick is a short smoke run.
bench: $(BENCH_STAMP) servers
	$(PY) -m bench $(BENCH_ARGS)

# The randomized differential test (tests/integration/test_differential.py) for SOAK_MINUTES (default 30)
# instead of CI's fixed number of steps; writes its figures into the last section of docs/reliability.md.
# KOPA_DIFF_SEED picks another sequence; KOPA_DIFF_OPS names the op kinds (the test's docstring lists them).
SOAK_MINUTES ?= 30
soak: $(STAMP) servers
	KOPA_DIFF_MINUTES=$(SOAK_MINUTES) $(PY) -m pytest -s tests/integration/test_differential.py

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,bench]'
	touch $(BENCH_STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
