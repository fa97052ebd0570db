"""The engine protocol: what every engine (sim, vllm, vllm_http) implements.

    generate(request) -> async iterator of Chunk   # streams, ends with finish_reason
    abort(request_id)                              # stop work for a request
    snapshot() -> ReplicaSnapshot                  # load, as vLLM's counters say

Engines translate their own failures into serving.errors.EngineError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol, runtime_checkable

from serving.types import ReplicaSnapshot


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...] = ()
    prompt: str | None = None  # text, for engines that tokenize themselves
    max_tokens: int = 16
    model: str = ""
    cache_salt: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = True
    block_hashes: tuple[int, ...] | None = None  # engine-block hashes, if the caller has them
    prompt_len: int | None = None  # token count when only hashes are given (traces)


@dataclass(frozen=True, slots=True)
class Chunk:
    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: str | None = None  # "length" | "stop" | "abort"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0  # cumulative


@runtime_checkable
class Engine(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]: ...

    async def abort(self, request_id: str) -> None: ...

    def snapshot(self) -> ReplicaSnapshot: ...
