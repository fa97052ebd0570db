"""SimEngine: a simulated vLLM replica that streams on the wall clock.

It runs `SimCore` (continuous batching, paged KV with prefix cache, the
profile's step time) in one background task per engine and sleeps each
step's predicted duration, so tokens arrive at the pace a real replica of
that profile would deliver them. It reports vLLM's counters in its snapshot.
Closing the `generate` iterator (a client went away) aborts the request.
`stop` strings end the answer where one first appears, as vLLM's do (not
included, finish_reason "stop", the rest never generated).
`kill()` makes it fail like a crashed replica, for failover tests.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from typing import AsyncIterator, Callable

import xxhash

from serving.engines.base import Chunk, GenerateRequest, PromptLogprob, TokenLogprob, default_seed
from serving.engines.profiles import EngineProfile, get_profile
from serving.engines.sim_json import shaped_pieces
from serving.engines.sim_core import Seq, SimCore
from serving.engines.tokenizer import VOCAB_SIZE, encode, piece as _piece
from serving.errors import ContextLengthExceeded, EngineError
from serving.prefix.hashing import block_hashes
from serving.types import Health, ReplicaSnapshot

_NO_STEP = (0.0, 0.0, 0)


_UNIFORM = -math.log(VOCAB_SIZE)
_MASK = (1 << 64) - 1


def _token(position: int) -> int:
    """The token a simulated answer has at `position` (its seed's start + i): scattered over the
    vocabulary, so answers from different starts differ all along, not only in where they begin."""
    x = (position + 0x9E3779B97F4A7C15) & _MASK  # splitmix64: neighbours come out unrelated
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return ((x ^ (x >> 31)) >> 32) % VOCAB_SIZE


def sim_logprobs(ids: tuple[int, ...], pieces: list[str], k: int | None) -> tuple[TokenLogprob, ...] | None:
    """A simulated engine's log-probabilities: it draws every token uniformly from the vocabulary,
    so each has log(1/vocab), and so have its alternatives (itself, then the k ids after it)."""
    if k is None:
        return None
    return tuple((p, _UNIFORM, ((p, _UNIFORM),) + tuple((_piece(t + j), _UNIFORM) for j in range(1, k + 1)))
                 for t, p in zip(ids, pieces))


def sim_prompt_logprobs(ids: tuple[int, ...], text: str | None, k: int | None) -> tuple[PromptLogprob, ...] | None:
    """The prompt's, as vLLM gives them: none for the first token; each other token's own
    log(1/vocab), and its alternatives (itself, then the k ids after it). A token is written as its
    word in the prompt's `text` with the space before it (one word is one token), else as the word
    simulated engines write for its id (what /detokenize gives)."""
    if k is None:
        return None
    words = re.findall(r"\s*\S+", text) if text else []
    out: list[PromptLogprob] = list(sim_logprobs(ids, words if len(words) == len(ids) else
                                                 [_piece(t) for t in ids], k) or ())
    if out:
        out[0] = (out[0][0], None, None)
    return tuple(out)


class StopStrings:
    """Stop strings on streamed tokens, as vLLM applies them: the answer ends where one
    first appears, without it (finish_reason "stop"). While streaming, tokens whose text
    could begin a stop string (the last longest-stop - 1 characters) are held back, whole:
    a failover continuation then resumes from the first token not delivered and
    generates the held text again, so nothing is lost and no part of a stop string is sent.
    `include`: vLLM's include_stop_str_in_output, the answer ends after the stop string."""

    def __init__(self, stops: tuple[str, ...], include: bool = False):
        self.stops = tuple(s for s in stops if s)
        self.include = include
        self.hit: str | None = None  # the stop string that ended the answer (vLLM's stop_reason)
        self.hold = max(map(len, self.stops), default=1) - 1
        self.text = ""  # generated, not yet released
        self.held: list[tuple[int, int]] = []  # its tokens: (id, end of the token's text in `text`)

    def feed(self, ids: tuple[int, ...], pieces: list[str], last: bool) -> tuple[tuple[int, ...], list[str], bool]:
        """(token ids to release, their texts, whether a stop string ended the answer)."""
        for t, p in zip(ids, pieces):
            self.text += p
            self.held.append((t, len(self.text)))
        # a stop string can only start in the unreleased text: one starting earlier would
        # have ended inside text already searched (the hold-back covers its length)
        hits = [(i, -len(s)) for s in self.stops if (i := self.text.find(s)) >= 0]
        if hits:  # the answer ends here, before the stop string (or after it: `include`)
            at, minus_len = min(hits)  # the first to start; of those, the longest
            self.hit = self.text[at:at - minus_len]
            return (tuple(t for t, _ in self.held),
                    self._texts(len(self.held), at - minus_len if self.include else at), True)
        limit = len(self.text) if last else len(self.text) - self.hold
        k = 0
        while k < len(self.held) and self.held[k][1] <= limit:
            k += 1
        end = self.held[k - 1][1] if k else 0
        out = self._texts(k, end)
        self.text = self.text[end:]
        rel = tuple(t for t, _ in self.held[:k])
        self.held = [(t, e - end) for t, e in self.held[k:]]
        return rel, out, False

    def _texts(self, k: int, cut: int) -> list[str]:
        """The first k held tokens' texts, the text cut at `cut`."""
        starts = [0] + [e for _, e in self.held[:k - 1]]
        return [self.text[min(a, cut):min(e, cut)] for a, (_, e) in zip(starts, self.held[:k])]


class SimEngine:
    def __init__(self, replica_id: str, region: str = "local", model: str = "sim",
                 profile: str | EngineProfile = "llama3-8b-h100", kv_capacity_tokens: int = 200_000,
                 time_scale: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.replica_id, self.region, self.model = replica_id, region, model
        self.profile = profile if isinstance(profile, EngineProfile) else get_profile(profile)
        self.core = SimCore(self.profile, kv_capacity_tokens)
        self.time_scale = time_scale
        self.clock = clock
        self.health = Health.UP
        self._task: asyncio.Task | None = None
        self._step = _NO_STEP  # (monotonic start, seconds, prefill tokens) of the step in flight
        self._wake: asyncio.Event | None = None

    # --- protocol ---------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        if self.health is Health.DOWN:
            raise EngineError(f"replica {self.replica_id} is down")
        tokens = request.prompt_token_ids or tuple(encode(request.prompt or ""))
        prompt_len = request.prompt_len or len(tokens)
        limit = min(self.profile.max_model_len, self.core.kv_capacity_tokens)
        if prompt_len + request.max_tokens > limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens; the request has "
                f"{prompt_len} prompt tokens and max_tokens {request.max_tokens}.", param="messages")
        hashes = request.block_hashes
        if hashes is None:
            hashes = block_hashes(tokens, self.profile.block_size, self.model, request.cache_salt)
        queue: asyncio.Queue = asyncio.Queue()
        seq = Seq(request.request_id, max(1, prompt_len), tuple(hashes), request.max_tokens, tag=queue)
        self.core.add(seq)
        self._ensure_loop()
        seed = default_seed(request.request_id) if request.seed is None else request.seed
        # structured outputs: the answer is this JSON, then ends (never continued: offset 0)
        shaped = shaped_pieces(request, seed)
        # token i of the full answer is _token(start + i), start a hash of the seed: seeds that
        # differ by one (vLLM's choices of n: seed + i) give unrelated answers, not shifted ones
        seed = xxhash.xxh64_intdigest(seed.to_bytes(16, "little", signed=True)) + request.token_offset
        stops = StopStrings(request.stop, bool(dict(request.sampling).get("include_stop_str_in_output"))) \
            if request.stop else None
        prompt_lps = sim_prompt_logprobs(tokens, request.prompt, request.prompt_logprobs)  # on the first chunk
        prompt_ids = tuple(tokens) if request.return_prompt_ids else None  # and these
        done = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                n, finished, out = item  # `out` as of emission: the queue may lag the core
                ids = tuple(_token(seed + out - n + k) for k in range(n))
                complete = False  # the JSON is whole: the answer stops
                if shaped is None:
                    pieces = [_piece(t) for t in ids]
                else:
                    pieces = shaped[out - n:out]
                    complete = out >= len(shaped)
                    ids, out = ids[:len(pieces)], out - n + len(pieces)
                reason = "stop" if complete else "length" if finished else None
                if stops is not None:
                    ids, pieces, stopped = stops.feed(ids, pieces, finished or complete)
                    if stopped:  # the rest is not generated: `finally` aborts it, freeing its KV
                        reason, complete = "stop", True
                done = finished and not complete
                yield Chunk(request.request_id, ids, "".join(pieces), reason, seq.prompt_len, seq.cached, out,
                            sim_logprobs(ids, pieces, request.logprobs), prompt_lps,
                            stops.hit if stops is not None else None, prompt_ids)
                prompt_lps = prompt_ids = None
                if finished or complete:  # after a stop the rest is not generated: `finally` aborts it
                    return
        finally:
            if not done:
                self.core.abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        seq = self.core.abort(request_id)
        if seq is not None and isinstance(seq.tag, asyncio.Queue):
            seq.tag.put_nowait(asyncio.CancelledError(f"request {request_id} aborted"))

    def snapshot(self) -> ReplicaSnapshot:
        c = self.core
        return ReplicaSnapshot(
            self.replica_id, self.region, self.model, num_running=len(c.running),
            num_waiting=len(c.waiting), waiting_prefill_tokens=c.pending_at(self._step[2], self._step_left()),
            running_tokens=sum(s.computed + s.out for s in c.running),
            kv_capacity_tokens=c.kv_capacity_tokens, kv_usage=c.pool.usage,
            prefix_cache_queries=c.queries, prefix_cache_hits=c.hits, health=self.health,
            profile=self.profile.name, timestamp=self.clock())

    def _step_left(self) -> float:
        """Fraction of the step in flight still to run (0 when none)."""
        start, dur, _ = self._step
        return (start + dur - time.monotonic()) / dur if dur > 0 else 0.0

    # --- operations ---------------------------------------------------------
    def reset_prefix_cache(self) -> None:
        self.core.pool.reset()

    def kill(self) -> None:
        """Crash: every in-flight request fails and new ones are refused."""
        self.health = Health.DOWN
        c = self.core
        for s in list(c.waiting) + list(c.running):
            c.abort(s.request_id)
            s.tag.put_nowait(EngineError(f"replica {self.replica_id} failed"))

    def revive(self) -> None:
        self.health = Health.UP

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # --- the step loop ------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        core, wake = self.core, self._wake
        assert wake is not None
        while True:
            if core.idle:
                wake.clear()
                await wake.wait()
                continue
            try:
                res = core.step()
            except ValueError as e:  # a request can never fit; fail it, keep serving
                s = core.waiting.popleft()
                core.pending_prefill -= s.prompt_len - s.computed
                s.tag.put_nowait(ContextLengthExceeded(str(e)))
                continue
            dur = res.duration_ms * self.time_scale / 1000.0
            self._step = (time.monotonic(), dur, res.prefill_tokens)
            await asyncio.sleep(dur)
            self._step = _NO_STEP
            for s, n in res.emitted:
                s.tag.put_nowait((n, s.out >= s.max_tokens, s.out))
