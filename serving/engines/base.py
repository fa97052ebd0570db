"""The engine protocol: what every engine (sim, vllm, vllm_http) implements.

    generate(request) -> async iterator of Chunk   # streams, ends with finish_reason
    abort(request_id)                              # stop work for a request
    snapshot() -> ReplicaSnapshot                  # load, as vLLM's counters say

Engines translate their own failures into serving.errors.EngineError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol, runtime_checkable

import xxhash

from serving.types import ReplicaSnapshot


# OpenAI's penalties and vLLM's extensions a request may set, passed to the engine as given
SAMPLING = ("presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "min_p", "min_tokens",
            "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
            "allowed_token_ids", "bad_words")
SAMPLING_ALL = SAMPLING + ("temperature", "top_p")  # every field of GenerateRequest.sampling_set()


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...] = ()
    prompt: str | None = None  # text, for engines that tokenize themselves
    max_tokens: int = 16
    model: str = ""
    cache_salt: str | None = None
    temperature: float | None = None  # None: the engine's default (a vLLM model's own,
    top_p: float | None = None  # from its generation_config, as vLLM's server applies it)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # more of vLLM's sampling, passed on where set (None: the engine's default); simulated
    # engines do not sample and ignore them
    # (SamplingParams field, value): SAMPLING as the client set them, logit_bias ({token id:
    # bias}), and skip_special_tokens False when the gateway reads tool-call tags from the
    # answer (serving.ingress.tools)
    sampling: tuple[tuple[str, Any], ...] = ()
    ignore_eos: bool = False  # vLLM's default: the answer ends at the model's end-of-sequence token
    # OpenAI's response_format (json_object, json_schema): vLLM's structured outputs constrain the
    # answer to it; None or type text: free text. Simulated engines write a JSON value of it (sim_json)
    response_format: dict[str, Any] | None = None
    # vLLM's structured_outputs (one of json, regex, choice, grammar, json_object, and options), as
    # the client set it; simulated engines honour json, json_object and choice (sim_json)
    structured_outputs: dict[str, Any] | None = None
    block_hashes: tuple[int, ...] | None = None  # engine-block hashes, if the caller has them
    prompt_len: int | None = None  # token count when only hashes are given (traces)
    # Deterministic continuation (failover after tokens were streamed): the new
    # request's prompt is the original prompt plus the tokens already sent, `seed`
    # is the original request's seed and `token_offset` the number already sent,
    # so an engine that samples from (seed, position) emits exactly the tokens the
    # uninterrupted stream would have. Real vLLM matches this only when greedy.
    token_offset: int = 0
    # log-probabilities: None, none; k, each generated token's own and its k most likely
    # alternatives' (Chunk.logprobs), as vLLM's SamplingParams.logprobs
    logprobs: int | None = None
    # the prompt's log-probabilities (completions' `echo` with `logprobs`, as vLLM's server asks
    # for them): k, each prompt token's own and its k most likely alternatives' (Chunk.prompt_logprobs)
    prompt_logprobs: int | None = None
    # vLLM's return_token_ids: the prompt's token ids, as the engine read the prompt, on the
    # answer's first chunk (Chunk.prompt_token_ids); the generated ids are in every chunk anyway
    return_prompt_ids: bool = False
    # W3C traceparent/tracestate (the gateway's span), x-session-id, x-agent-step: engines
    # pass them on (vllm_http as HTTP headers, vllm as trace_headers) or just carry them (sim)
    trace_headers: tuple[tuple[str, str], ...] = ()

    @property
    def constrained(self) -> bool:
        """The answer is held to a format (structured outputs) from its first token."""
        return bool(self.response_format or self.structured_outputs)

    def sampling_set(self) -> dict[str, Any]:
        """The sampling the client set: `sampling`, and `temperature` and `top_p` if given. A vLLM
        engine takes the rest from the model's generation_config, as vLLM's server does."""
        out: dict[str, Any] = dict(self.sampling)
        out.update((k, v) for k, v in (("temperature", self.temperature), ("top_p", self.top_p)) if v is not None)
        return out


def default_seed(request_id: str) -> int:
    """The seed an engine uses when the request names none (stable across replicas)."""
    return xxhash.xxh64_intdigest(request_id.encode())


# One generated token's log-probability: (its text, logprob, the alternatives as vLLM lists them:
# ((text, logprob), ...), the token itself first, then the k most likely, best first; fewer where
# they coincide). Completions show them all, chat the first k (vLLM's servers do the same).
TokenLogprob = tuple[str, float, tuple[tuple[str, float], ...]]
# One prompt token's: the same, and the first token's has neither (nothing comes before it):
# (its text, None, None). The alternatives are vLLM's: the token itself and the k most likely.
PromptLogprob = tuple[str, float | None, tuple[tuple[str, float], ...] | None]


@dataclass(frozen=True, slots=True)
class Chunk:
    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: str | None = None  # "length" | "stop" | "abort"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0  # cumulative
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token_ids entry, if the request asked
    # one per prompt token, on the answer's first chunk, if the request asked (prompt_logprobs)
    prompt_logprobs: tuple[PromptLogprob, ...] | None = None
    # vLLM's stop_reason, on the last chunk: the stop string or stop token id that ended the answer
    # (None: the model's end of sequence, or max_tokens)
    stop_reason: str | int | None = None
    # the prompt's token ids as the engine read it, on the answer's first chunk, if the request
    # asked (return_prompt_ids)
    prompt_token_ids: tuple[int, ...] | None = None


@runtime_checkable
class Engine(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]: ...

    async def abort(self, request_id: str) -> None: ...

    def snapshot(self) -> ReplicaSnapshot: ...
