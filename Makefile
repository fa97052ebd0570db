# Two commands on a fresh clone: `make run` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: run demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev,ray]"
	rm -f $(VENV)/.installed-* && touch $@

# The gateway in the foreground on 127.0.0.1:8000: three logical regions of
# simulated engines (deployments/local.yaml). Ctrl-C stops it and its Ray.
run: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/serve run deployments/local.yaml

demo: $(STAMP)
	$(BIN)/python -m serving.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m serving.bench.routing

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
