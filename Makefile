# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[ros,dev]'
	touch $(STAMP)

install: $(STAMP)

# Both tiers, as CI runs them.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# The inner loop: everything not marked slow (about a minute on an idle 2-core CPU; the slow tier ~7 min).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(PY) -m distill.verbs.demo

# Each script prints its figures and writes benchmarks/results/<name>.json (distill_gain and soak take long).
bench: $(STAMP)
	$(PY) benchmarks/synth_speed.py
	$(PY) benchmarks/latency.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/node_latency.py
	$(PY) benchmarks/completion.py
	$(PY) benchmarks/distill_gain.py
	$(PY) benchmarks/soak.py

clean:
	rm -rf runs .pytest_cache
