PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-core test-lightning test-keras lint clean bench

install: $(STAMP)

# Re-runs only when the packaging inputs change, so a second `make install` is a no-op.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

demo: install
	$(PY) -m benchmarks.demo

# Keras fixes its backend once per process, so each backend gets its own pytest run. The Keras programs of
# the real-program corpus run on TensorFlow (on torch and JAX they gave the same alerts, 2026-12-02), and
# so do the Keras tests marked one_backend (Keras-level logic: options, files, state, healthy twins, loss
# dynamics); everything that touches the backend (probing, reads, bounds, actions, firing) runs on all three.
KERAS_CORPUS = tests/realworld/test_keras_corpus.py tests/realworld/test_keras_slow_starters.py
test: install
	$(PY) -m ruff check boundguard integrations benchmarks tests
	$(PY) -m mypy boundguard integrations --ignore-missing-imports
	$(PY) -m pytest tests -q --ignore=tests/integrations/keras $(addprefix --ignore=,$(KERAS_CORPUS))
	KERAS_BACKEND=tensorflow $(PY) -m pytest tests/integrations/keras $(KERAS_CORPUS) -q
	KERAS_BACKEND=torch $(PY) -m pytest tests/integrations/keras -q -m "not one_backend"
	KERAS_BACKEND=jax $(PY) -m pytest tests/integrations/keras -q -m "not one_backend"

lint: install
	$(PY) -m ruff check boundguard integrations tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info

# Overhead counted in instructions under valgrind's callgrind (deterministic; about 15 minutes on 2 cores).
bench: install
	$(PY) -m benchmarks.instructions
