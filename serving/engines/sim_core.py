"""A vLLM replica's scheduler, in time-free form: one call = one engine step.

Continuous batching as vLLM v1 schedules it: every step first gives each
running, prefilled sequence one decode token, then spends the rest of the
token budget on prefill (chunked: a long prompt may take several steps),
continuing partial prefills before admitting waiting requests in arrival
order. A request is admitted only if the KV blocks for its uncached prompt
fit; a decoding sequence that needs a block when none is free preempts the
most recently admitted one (recompute, as vLLM does). Step time is the
profile's `a + b * prefill_tokens + c * decode_seqs`.

SimEngine runs this on the wall clock; the discrete-event simulator runs it
in virtual time and uses `step(max_steps=k)` to jump over runs of identical
decode-only steps instead of simulating each.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from serving.engines.kv import BlockPool
from serving.engines.profiles import EngineProfile


@dataclass(slots=True, eq=False)
class Seq:
    request_id: str
    prompt_len: int
    hashes: tuple[int, ...]  # full prompt blocks, engine block size
    max_tokens: int
    tag: Any = None  # the owner's payload (a queue, a sim record)
    computed: int = 0  # prompt tokens whose KV exists
    cached: int = 0  # prompt tokens that came from the prefix cache
    out: int = 0  # tokens generated
    held: list[int] = field(default_factory=list)  # hashed blocks referenced
    anon: int = 0  # anonymous blocks held
    admitted: bool = False
    preemptions: int = 0

    @property
    def prefilled(self) -> bool:
        return self.computed >= self.prompt_len

    @property
    def blocks(self) -> int:
        return len(self.held) + self.anon


@dataclass(slots=True)
class StepResult:
    duration_ms: float
    steps: int
    prefill_tokens: int
    decode_seqs: int
    emitted: list[tuple[Seq, int]]  # (seq, new tokens); first token when seq.out == n
    finished: list[Seq]


class SimCore:
    def __init__(self, profile: EngineProfile, kv_capacity_tokens: int):
        self.profile = profile
        self.bs = profile.block_size
        self.pool = BlockPool(max(1, kv_capacity_tokens // self.bs), self.bs)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.pending_prefill = 0  # prompt tokens not yet computed, waiting + running
        self.queries = 0  # prefix cache, in tokens, as vLLM counts
        self.hits = 0
        self.preemptions = 0
        self.steps = 0

    @property
    def kv_capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.bs

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def hit_blocks(self, s: Seq) -> int:
        """Leading blocks of `s` that admitting it now would take from the prefix cache."""
        hit = self.pool.cached_prefix(s.hashes)
        if hit * self.bs >= s.prompt_len:  # vLLM recomputes at least the last token
            hit = (s.prompt_len - 1) // self.bs
        return hit

    @property
    def uncached_pending(self) -> int:
        """Prompt tokens still to compute, as an engine reports its queue to the router.

        `pending_prefill` counts waiting prompts whole; the part of each that is
        already in the prefix cache (as of now) costs nothing and is left out.
        The step in flight is not included: see `pending_at`."""
        pending = self.pending_prefill
        if self.waiting:
            pending -= sum(map(self.hit_blocks, self.waiting)) * self.bs
        return pending

    def add(self, seq: Seq) -> None:
        if seq.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        self.waiting.append(seq)
        self.pending_prefill += seq.prompt_len

    def abort(self, request_id: str) -> Seq | None:
        for s in self.waiting:
            if s.request_id == request_id:
                self.waiting.remove(s)
                self.pending_prefill -= s.prompt_len - s.computed
                return s
        for s in self.running:
            if s.request_id == request_id:
                self._release(s)
                self.running.remove(s)
                self.pending_prefill -= s.prompt_len - s.computed
                return s
        return None

    # --- one step -----------------------------------------------------------
    def step(self, max_steps: int = 1, horizon_ms: float = float("inf")) -> StepResult:
        p = self.profile
        bs = self.bs
        decoding = []
        preempted_before = self.preemptions
        for s in list(self.running):  # oldest first; victims are taken from the newest
            if not s.admitted or s.computed < s.prompt_len:
                continue
            # (attributes inlined: this loop runs for every sequence on every step)
            while s.admitted and (len(s.held) + s.anon) * bs < s.prompt_len + s.out + 1:
                if not self._grow(s):
                    break
            if s.admitted:
                decoding.append(s)
        if self.preemptions != preempted_before:  # a later one's growth preempted an earlier one
            decoding = [s for s in decoding if s.admitted]
        budget = p.max_num_batched_tokens - len(decoding)
        prefill_tokens = 0
        done_prefill: list[Seq] = []
        for s in self.running:
            if budget <= 0:
                break
            if not s.prefilled:
                n = self._prefill(s, budget)
                budget -= n
                prefill_tokens += n
                if s.prefilled:
                    done_prefill.append(s)
        while self.waiting and budget > 0 and len(self.running) < p.max_num_seqs:
            s = self.waiting[0]
            if not self._admit(s):
                break
            self.waiting.popleft()
            self.running.append(s)
            n = self._prefill(s, budget)
            budget -= n
            prefill_tokens += n
            if s.prefilled:
                done_prefill.append(s)

        steps = 1
        step_ms = p.step_ms(prefill_tokens, len(decoding))
        if max_steps > 1 and prefill_tokens == 0 and decoding and not done_prefill:
            steps = self._jump_len(decoding, max_steps, horizon_ms, step_ms)
        self.steps += steps
        emitted, finished = [], []
        for s in decoding:
            s.out += steps
            emitted.append((s, steps))
        for s in done_prefill:
            s.out += 1
            emitted.append((s, 1))
        for s, _ in emitted:
            if s.out >= s.max_tokens:
                finished.append(s)
        if finished:
            gone = set(map(id, finished))
            self.running = [s for s in self.running if id(s) not in gone]
            for s in finished:
                self._release(s)
        return StepResult(step_ms * steps, steps, prefill_tokens, len(decoding), emitted, finished)

    def pending_at(self, step_prefill: int, left_frac: float) -> int:
        """`uncached_pending` plus the part of the step in flight still to run.

        `step` applies a step's effects when it starts, while its owner waits out
        its duration: of that step's `step_prefill` tokens (its StepResult's
        `prefill_tokens`), the `left_frac` of its duration not yet passed is
        still work ahead of a newcomer: a replica half-way through a long prefill
        step has that much, not none and not all of it."""
        return self.uncached_pending + round(step_prefill * min(1.0, max(0.0, left_frac)))

    # --- internals --------------------------------------------------------
    def _jump_len(self, decoding: list[Seq], max_steps: int, horizon_ms: float, step_ms: float) -> int:
        k = min(max_steps, min(s.max_tokens - s.out for s in decoding))
        if step_ms > 0 and horizon_ms != float("inf"):
            k = min(k, max(1, int(horizon_ms // step_ms)))
        bs = self.bs
        extras = []
        need = 0
        for s in decoding:
            extra = -(-(s.prompt_len + s.out + k) // bs) - len(s.held) - s.anon
            if extra > 0:
                extras.append((s, extra))
                need += extra
        if need > self.pool.num_free:
            return 1
        for s, extra in extras:
            self.pool.allocate(extra)
            s.anon += extra
        return max(1, k)

    def _admit(self, s: Seq) -> bool:
        pool, bs = self.pool, self.bs
        hit = self.hit_blocks(s)
        need = -(-s.prompt_len // bs) - hit
        refs = s.hashes[:hit]
        if not pool.can_allocate(need, refs):
            if not self.running and need > pool.num_blocks:
                raise ValueError(f"prompt of {s.prompt_len} tokens exceeds the KV cache")
            return False
        pool.ref(refs)
        pool.allocate(need)
        s.held = list(refs)
        s.anon = need
        s.cached = s.computed = hit * bs
        s.admitted = True
        self.pending_prefill -= s.cached
        self.queries += s.prompt_len
        self.hits += s.cached
        return True

    def _prefill(self, s: Seq, budget: int) -> int:
        n = min(budget, s.prompt_len - s.computed)
        before = s.computed // self.bs
        s.computed += n
        self.pending_prefill -= n
        after = min(s.computed // self.bs, len(s.hashes))
        lo = max(before, len(s.held))
        if after > lo:
            new = s.hashes[lo:after]
            self.pool.promote_many(new)
            s.held.extend(new)
            s.anon -= after - lo
        return n

    def _grow(self, s: Seq) -> bool:
        """Give a decoding sequence one more block, preempting the newest if full."""
        while not self.pool.can_allocate(1):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is s:
                return False
        self.pool.allocate(1)
        s.anon += 1
        return True

    def _preempt(self, s: Seq) -> None:
        self.running.remove(s)
        self._release(s)
        self.pending_prefill += s.computed
        s.computed = s.cached = 0
        s.admitted = False
        s.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(s)

    def _release(self, s: Seq) -> None:
        if s.admitted or s.held or s.anon:
            self.pool.free(s.held, s.anon)
        s.held, s.anon = [], 0
