"""`vllm_http` engine: an existing vLLM OpenAI server, reached with aiohttp.

    generate  POST {url}/v1/completions, stream=True, the prompt as text when
              the caller has text (vLLM tokenizes it with the model's own
              tokenizer; the gateway's ids come from its word tokenizer) and as
              token ids otherwise (trace replay, clients sending ids);
              `cache_salt`, `ignore_eos` and `return_token_ids` passed
              through, and of `temperature`, `top_p`, the penalties, `top_k`
              and `min_p` those the client set (vLLM applies the model's
              generation_config to the rest), and a JSON `response_format`;
              SSE chunks become Chunks
    abort     close the response: vLLM aborts a request whose client went away
    snapshot  vLLM's own /metrics (running, waiting, KV usage, prefix-cache
              queries and hits, KV capacity from cache_config_info), polled in
              the background, plus this client's estimate of queued prefill
              tokens (see engines.pending)

Failures (connection refused, 5xx, a stream cut short) are translated into
EngineError, and the replica is marked down until a metrics poll succeeds
again; a 4xx from vLLM becomes InvalidRequest (or ContextLengthExceeded).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace
from typing import Any, AsyncIterator

import aiohttp

from serving.engines import prom
from serving.engines.base import Chunk, GenerateRequest, PromptLogprob, TokenLogprob
from serving.engines.pending import PendingPrefill
from serving.errors import ContextLengthExceeded, EngineError, InvalidRequest, ProximaError
from serving.types import Health, ReplicaSnapshot

log = logging.getLogger(__name__)

METRICS = frozenset({
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:cache_config_info",
})


class VLLMHttpEngine:
    def __init__(self, replica_id: str, url: str, *, region: str = "local", model: str = "",
                 served_model: str | None = None, profile: str = "tiny-cpu", block_size: int = 128,
                 kv_capacity_tokens: int = 0, poll_interval_s: float = 0.25,
                 connect_timeout_s: float = 2.0, read_timeout_s: float = 600.0,
                 clock=time.monotonic):
        self.replica_id, self.region, self.model = replica_id, region, model
        self.url = url.rstrip("/")
        self.served_model = served_model or model
        self.profile = profile
        self.block_size = block_size
        self.kv_capacity_tokens = kv_capacity_tokens
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s,
                                              sock_read=read_timeout_s)
        self.pending = PendingPrefill(block_size, model, kv_capacity_tokens // block_size)
        self.health = Health.DOWN  # until the first metrics poll answers
        self._metrics: dict[str, float] = {}
        self._taken_at = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task | None = None
        self._streams: dict[str, aiohttp.ClientResponse] = {}
        self._aborted: set[str] = set()

    # --- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        """Open the HTTP session, read /metrics once and keep polling it."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        await self.poll()
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_loop())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
            self._poller = None
        for resp in list(self._streams.values()):
            resp.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- protocol ---------------------------------------------------------------
    async def generate(self, request: GenerateRequest, *,
                       headers: dict[str, str] | None = None) -> AsyncIterator[Chunk]:
        """Stream a completion; `headers` go along (e.g. `x-session-id` for a router in front)."""
        session = await self._ensure_session()
        rid = request.request_id
        ids = list(request.prompt_token_ids)
        body = self._body(request, ids)
        if ids:
            self.pending.add(rid, ids, request.cache_salt)
        resp: aiohttp.ClientResponse | None = None
        prompt_tokens = len(ids)
        try:
            try:
                resp = await session.post(self.url + "/v1/completions", json=body,
                                          headers={"X-Request-Id": rid, **dict(request.trace_headers),
                                                   **(headers or {})})
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                raise self._down(f"replica {self.replica_id} unreachable", e) from None
            if resp.status != 200:
                raise await self._http_error(resp)
            self._streams[rid] = resp
            out, last = 0, None
            echoed = request.prompt_logprobs is not None
            async for data in _sse(resp):
                if data.get("error"):
                    raise self._stream_error(data["error"])
                usage = data.get("usage") or {}
                choices = data.get("choices") or []
                if not choices:
                    # vLLM reports cached tokens only in the closing usage event,
                    # which comes after the finish: hold the last chunk until then.
                    if last is not None:
                        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                        yield replace(last, cached_tokens=cached)
                        return
                    continue
                ch = choices[0]
                toks = tuple(ch.get("token_ids") or ())
                prompt_ids = None
                if ch.get("prompt_token_ids"):  # the first event's (we ask with return_token_ids)
                    prompt_tokens = len(ch["prompt_token_ids"])
                    if request.return_prompt_ids:
                        prompt_ids = tuple(ch["prompt_token_ids"])
                if toks or ch.get("text"):
                    self.pending.done(rid)
                out = usage.get("completion_tokens", out + len(toks))
                lp, prompt_lps = ch.get("logprobs"), None
                if echoed and lp:  # `echo`: the first event's logprobs begin with the prompt's
                    lp, prompt_lps = _split_echo(lp, prompt_tokens)
                    echoed = False
                chunk = Chunk(rid, toks, ch.get("text") or "", ch.get("finish_reason"),
                              usage.get("prompt_tokens", prompt_tokens), 0, out,
                              None if request.logprobs is None else _logprobs(lp), prompt_lps,
                              ch.get("stop_reason"), prompt_ids)
                if chunk.finish_reason:
                    last = chunk
                else:
                    yield chunk
            if last is not None:  # [DONE] without a usage event
                yield last
                return
            if rid in self._aborted:
                raise asyncio.CancelledError(f"request {rid} aborted")
            raise self._down(f"replica {self.replica_id} closed the stream early")
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            if rid in self._aborted:  # we closed it (abort): the replica is fine
                raise asyncio.CancelledError(f"request {rid} aborted") from None
            raise self._down(f"replica {self.replica_id} failed mid-stream", e) from None
        finally:
            self._aborted.discard(rid)
            self.pending.done(rid)
            self._streams.pop(rid, None)
            if resp is not None:
                resp.close()  # after an early exit this is the abort: vLLM sees the disconnect

    async def abort(self, request_id: str) -> None:
        """Close the request's stream; its `generate` ends with CancelledError."""
        resp = self._streams.pop(request_id, None)
        if resp is not None:
            self._aborted.add(request_id)
            resp.close()
        self.pending.done(request_id)

    def snapshot(self) -> ReplicaSnapshot:
        m = self._metrics
        return ReplicaSnapshot(
            self.replica_id, self.region, self.model,
            num_running=int(m.get("vllm:num_requests_running", 0)),
            num_waiting=int(m.get("vllm:num_requests_waiting", 0)),
            waiting_prefill_tokens=max(0, self.pending.tokens),
            kv_capacity_tokens=self.kv_capacity_tokens,
            kv_usage=float(m.get("vllm:kv_cache_usage_perc", 0.0)),
            prefix_cache_queries=int(m.get("vllm:prefix_cache_queries_total", 0)),
            prefix_cache_hits=int(m.get("vllm:prefix_cache_hits_total", 0)),
            health=self.health, profile=self.profile, timestamp=self._taken_at)

    # --- operations ---------------------------------------------------------------
    async def poll(self) -> bool:
        """Read /metrics once; marks the replica up or down. Returns True if it answered."""
        session = await self._ensure_session()
        try:
            async with session.get(self.url + "/metrics",
                                   timeout=aiohttp.ClientTimeout(total=max(1.0, self.poll_interval_s * 8))) as r:
                if r.status != 200:
                    raise aiohttp.ClientError(f"status {r.status}")
                text = await r.text()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            self.health = Health.DOWN
            return False
        values, labels = prom.parse(text, METRICS)
        info = labels.get("vllm:cache_config_info", {})
        if info.get("num_gpu_blocks", "").isdigit():
            bs = int(info.get("block_size", self.block_size) or self.block_size)
            self.kv_capacity_tokens = int(info["num_gpu_blocks"]) * bs
            if self.pending.capacity_blocks != int(info["num_gpu_blocks"]):
                self.pending.resize(int(info["num_gpu_blocks"]))
        self._metrics = values
        self._taken_at = self.clock()
        self.health = Health.UP
        return True

    async def reset_prefix_cache(self) -> None:
        """POST /reset_prefix_cache (the server needs VLLM_SERVER_DEV_MODE=1)."""
        session = await self._ensure_session()
        try:
            async with session.post(self.url + "/reset_prefix_cache") as r:
                if r.status != 200:
                    raise EngineError(f"replica {self.replica_id}: reset_prefix_cache returned {r.status} "
                                      "(start vLLM with VLLM_SERVER_DEV_MODE=1)")
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise self._down(f"replica {self.replica_id} unreachable", e) from None
        self.pending.clear()

    # --- internals ------------------------------------------------------------------
    def _body(self, r: GenerateRequest, ids: list[int]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.served_model, "prompt": r.prompt if r.prompt else ids,
            "max_tokens": r.max_tokens, "stream": True, "ignore_eos": r.ignore_eos, "return_token_ids": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        if r.seed is not None:
            body["seed"] = r.seed % (1 << 63)  # vLLM takes signed 64-bit seeds
        if r.stop:
            body["stop"] = list(r.stop)
        # only what the client set: vLLM applies the model's generation_config to the rest
        body.update(r.sampling_set())
        if r.logprobs is not None:
            body["logprobs"] = r.logprobs
        if r.prompt_logprobs is not None:
            # vLLM streams the prompt's logprobs only for `echo` (k = `logprobs`), before the
            # answer's in the first event; with return_token_ids it echoes no prompt text
            body["echo"] = True
            body["logprobs"] = max(r.prompt_logprobs, r.logprobs or 0)
        if r.response_format:  # vLLM's completions endpoint takes it too: structured outputs
            body["response_format"] = r.response_format
        if r.structured_outputs:
            body["structured_outputs"] = r.structured_outputs
        if r.cache_salt:
            body["cache_salt"] = r.cache_salt
        return body

    async def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    def _down(self, message: str, cause: BaseException | None = None) -> EngineError:
        """The replica is down. The client's error names the replica and the kind of failure; the
        cause's own text (URLs, hosts, the engine's internals) goes to the log only."""
        self.health = Health.DOWN
        if cause is None:
            return EngineError(message)
        log.warning("%s: %s: %s", message, type(cause).__name__, cause)
        return EngineError(f"{message} ({type(cause).__name__})")

    def _failed(self, msg: str, status: int | str | None) -> EngineError:
        """An engine's own error (5xx): its text is logged, the client's error only says so."""
        log.warning("replica %s: engine error %s: %s", self.replica_id, status or "", msg)
        return EngineError(f"replica {self.replica_id}: the engine failed" + (f" (status {status})" if status else ""))

    def _stream_error(self, err: Any) -> ProximaError:
        """An error event in vLLM's stream: the request's fault (a 4xx code, say a JSON schema its
        grammar engine refuses) is the client's 400, not a failed replica to fail over from."""
        msg = str(err.get("message", err)) if isinstance(err, dict) else str(err)
        code = err.get("code") if isinstance(err, dict) else None
        try:
            client = 400 <= int(code) < 500 and int(code) not in (408, 429)
        except (TypeError, ValueError):
            client = isinstance(err, dict) and err.get("type") in ("BadRequestError", "invalid_request_error")
        return _request_error(msg) if client else self._failed(msg, code)

    async def _http_error(self, resp: aiohttp.ClientResponse) -> ProximaError:
        try:
            err = (await resp.json(content_type=None)).get("error") or {}
            msg = err.get("message") if isinstance(err, dict) else str(err)
        except (ValueError, aiohttp.ClientError, AttributeError):
            msg = None
        msg = msg or f"status {resp.status}"
        resp.close()
        if 400 <= resp.status < 500 and resp.status not in (408, 429):
            return _request_error(msg)
        if resp.status >= 500:
            self.health = Health.DOWN if resp.status in (502, 503) else self.health
        return self._failed(msg, resp.status)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            await self.poll()


async def _sse(resp: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The JSON payloads of a server-sent-events stream, until [DONE]."""
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        try:
            yield json.loads(payload)
        except ValueError:
            raise EngineError("malformed event from vLLM") from None


HTTP_OPTIONS = {"url", "served_model", "poll_interval_s", "block_size", "connect_timeout_s", "read_timeout_s",
                "profile"}


def make_vllm_http(spec) -> VLLMHttpEngine:
    """Factory kind `vllm_http` (serving.engines.factory): options url (required),
    served_model (default: the model name), poll_interval_s, block_size, timeouts."""
    from serving.engines.vllm_engine import model_options  # light: vLLM itself is imported lazily

    opts = model_options("vllm_http", dict(spec.options), spec.model, HTTP_OPTIONS)
    if not opts.get("url"):
        raise ValueError("engine kind 'vllm_http' needs options.url (the vLLM server, e.g. http://host:8000)")
    return VLLMHttpEngine(spec.replica_id, opts.pop("url"), region=spec.region, model=spec.model,
                          profile=opts.pop("profile", spec.profile), kv_capacity_tokens=spec.kv_capacity_tokens,
                          **opts)


def _request_error(msg: str) -> InvalidRequest:
    """vLLM refused the request itself (a 4xx): the client's error, with vLLM's words."""
    if "context length" in msg or "maximum context" in msg or "max_tokens" in msg:
        return ContextLengthExceeded(msg, param="messages")
    return InvalidRequest(msg)


def _split_echo(lp: dict[str, Any], prompt_tokens: int) -> tuple[dict[str, Any], tuple[PromptLogprob, ...]]:
    """An echoed first event's logprobs: the answer's (the rest, in the endpoint's shape) and the
    prompt's `prompt_tokens` entries (every alternative vLLM gave kept; the first has none)."""
    keys = ("tokens", "token_logprobs", "top_logprobs")
    cols = [list(lp.get(k) or ()) for k in keys]
    prompt: list[PromptLogprob] = list(_logprobs({k: c[:prompt_tokens] for k, c in zip(keys, cols)}))
    if prompt:
        prompt[0] = (prompt[0][0], None, None)
    return {k: c[prompt_tokens:] for k, c in zip(keys, cols)}, tuple(prompt)


def _logprobs(lp: dict[str, Any] | None) -> tuple[TokenLogprob, ...]:
    """The completions endpoint's logprobs (tokens, token_logprobs, top_logprobs) as Chunk.logprobs;
    each token's alternatives as vLLM's server wrote them (the token itself, then the top k)."""
    if not lp:
        return ()
    tops = lp.get("top_logprobs") or []
    out = []
    for i, (tok, val) in enumerate(zip(lp.get("tokens") or (), lp.get("token_logprobs") or ())):
        out.append((tok, val, tuple((tops[i] or {}).items() if i < len(tops) else ())))
    return tuple(out)
