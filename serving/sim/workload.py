"""Workload sources: Mooncake traces and synthetic generators, as one arrival stream.

Every source yields `Arrival`s in time order; `arrivals()` merges them. The
stream is a pure function of the scenario and its seed, so every policy sees
the identical arrivals. Steps of a session are open-loop (issued at times
drawn up front, not after the previous answer) for the same reason.

A prompt's content is a list of segments `(key, tokens, shared)`: a segment
key names content that other prompts may repeat (a system prompt, a session's
growing history, a trace's 512-token block); `shared=False` marks content no
other prompt repeats. `content.Hasher` turns segments into the engine's
chained block hashes.

Generators (knobs: a number, or [lo, hi] drawn uniformly per use):

- agent_sessions: sessions over one of `system_prompts` shared system prompts;
  each step appends a tool result (the first: the user's task) and the
  previous answer to the history, `step_gap_s` apart.
- shared_prefix: one request per arrival; a group's long shared prefix plus a
  unique question (SGLang's generated-shared-prefix benchmark). Group g is
  drawn with weight 1 / (g + 1) ** group_skew (0: uniform; 1: Zipf, a few hot
  prefixes, as popular system prompts are).
- chat / voice: multi-turn conversations over a short shared system prompt;
  voice is short, with a tight TTFT SLO (300 ms unless `slo` says otherwise).
- no_reuse: unique prompts; the control where no policy can find a cache hit.

`rate_per_s` counts new sessions for agent_sessions, chat and voice and
requests for the others.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import xxhash

from serving.sim.scenario import Scenario, ScenarioError, Source

GENERATOR_PARAMS: dict[str, dict[str, Any]] = {
    "agent_sessions": {"system_prompt_tokens": 2000, "system_prompts": 4, "user_tokens": 300,
                       "steps": [4, 12], "tool_tokens": [100, 800], "output_tokens": [50, 300],
                       "step_gap_s": [1.0, 4.0]},
    "shared_prefix": {"groups": 16, "prefix_tokens": 2048, "question_tokens": 128, "output_tokens": 256,
                      "group_skew": 0.0},
    "chat": {"system_prompt_tokens": 200, "system_prompts": 1, "turns": [2, 8], "user_tokens": [20, 200],
             "output_tokens": [100, 400], "think_s": [5.0, 30.0]},
    "voice": {"system_prompt_tokens": 300, "system_prompts": 1, "turns": 1, "user_tokens": [10, 60],
              "output_tokens": [20, 80], "think_s": [3.0, 10.0]},
    "no_reuse": {"prompt_tokens": [500, 1500], "output_tokens": [100, 300]},
}

TRACE_BLOCK = 512  # tokens per Mooncake hash id


@dataclass(slots=True)
class Arrival:
    t: float  # seconds of virtual time
    region: str  # the client's region
    prompt_len: int
    output_len: int
    segments: tuple  # ((key, tokens, shared), ...): see the module docstring
    tenant: str = ""
    model: str = "default"
    session_id: str | None = None
    slo_ttft_ms: float | None = None
    source: int = 0

    def __lt__(self, other: "Arrival") -> bool:  # heapq.merge ties: keep it total
        return self.t < other.t


def arrivals(sc: Scenario) -> Iterator[Arrival]:
    """Every source's arrivals in [0, duration_s), merged in time order."""
    streams = [_source(sc, i, src) for i, src in enumerate(sc.workload)]
    return heapq.merge(*streams, key=lambda a: (a.t, a.source))


def _key(*parts: Any) -> int:
    return xxhash.xxh3_64_intdigest(repr(parts).encode()) & ((1 << 60) - 1)


def _source(sc: Scenario, i: int, src: Source) -> Iterator[Arrival]:
    end = min(sc.duration_s, src.end_s if src.end_s is not None else math.inf)
    if src.kind == "trace":
        return _trace(sc, i, src, end)
    streams = [_generator(sc, i, src, region, rate, end)
               for region, rate in sorted(src.rate_per_s.items()) if rate > 0]
    return heapq.merge(*streams, key=lambda a: a.t)


# --- traces -------------------------------------------------------------------
@lru_cache(maxsize=8)
def read_trace(path: Path) -> tuple[tuple, ...]:
    """Parsed rows (t_ms, input, output, hash_ids, region, session, tenant, line), validated once,
    in time order (`line`: where the record is in the file, for errors)."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                row = (float(r["timestamp"]), int(r["input_length"]), int(r["output_length"]),
                       tuple(int(h) for h in r.get("hash_ids", ())), r.get("region"),
                       r.get("session_id"), r.get("tenant"), n)
            except (ValueError, KeyError, TypeError) as e:
                raise ScenarioError(f"{path}:{n}: bad trace record ({type(e).__name__}: {e})") from None
            if row[1] < 1 or row[2] < 1:
                raise ScenarioError(f"{path}:{n}: input_length and output_length must be >= 1")
            rows.append(row)
    rows.sort(key=lambda r: r[0])
    return tuple(rows)


def _trace(sc: Scenario, i: int, src: Source, end: float) -> Iterator[Arrival]:
    known = set(sc.regions) | set(sc.rtt_ms)
    fallback = src.default_region or next(iter(sc.regions))
    for n, (t_ms, inp, out, ids, region, session, tenant, line) in enumerate(read_trace(src.path)):
        t = src.start_s + t_ms * src.time_scale / 1000.0
        if t >= end:
            return
        region = region or fallback
        if region not in known:
            raise ScenarioError(f"{src.path}:{line}: region {region!r} is not in the scenario")
        segs = []
        left = inp
        for h in ids:
            if left <= 0:
                break
            segs.append((h, min(TRACE_BLOCK, left), True))
            left -= TRACE_BLOCK
        if left > 0:  # more tokens than hash ids: unique content
            segs.append((_key("trace-tail", i, n), left, False))
        yield Arrival(t, region, inp, out, tuple(segs), tenant or src.tenant, src.model,
                      session, src.slo_ttft_ms, i)


# --- generators ---------------------------------------------------------------
def _draw(rng: random.Random, v: Any) -> float:
    return rng.uniform(v[0], v[1]) if isinstance(v, list) else v


def _drawi(rng: random.Random, v: Any) -> int:
    return max(1, int(round(_draw(rng, v))))


def _times(rng: random.Random, rate: float, src: Source, end: float) -> Iterator[float]:
    """Poisson arrivals, thinned by the diurnal curve when there is one."""
    d = src.diurnal
    peak = rate * (1 + d.amplitude) if d else rate
    t = src.start_s
    while True:
        t += rng.expovariate(peak)
        if t >= end:
            return
        if d is None or rng.random() * peak <= rate * (
                1 + d.amplitude * math.cos(2 * math.pi * (t - d.peak_s) / d.period_s)):
            yield t


def _generator(sc: Scenario, i: int, src: Source, region: str, rate: float, end: float) -> Iterator[Arrival]:
    p = {**GENERATOR_PARAMS[src.kind], **src.params}
    rng = random.Random(_key(sc.seed, i, region))
    kind = src.kind
    if kind in ("shared_prefix", "no_reuse"):
        groups = max(1, int(p.get("groups", 1)))
        cum = list(itertools.accumulate(1.0 / (g + 1) ** float(p.get("group_skew", 0.0)) for g in range(groups)))
        for n, t in enumerate(_times(rng, rate, src, end)):
            uniq = _key(kind, i, region, n)
            if kind == "shared_prefix":
                g = rng.choices(range(groups), cum_weights=cum)[0]
                pre, q = _drawi(rng, p["prefix_tokens"]), _drawi(rng, p["question_tokens"])
                segs = ((_key("group", src.tenant, g, pre), pre, True), (uniq, q, False))
            else:
                segs = ((uniq, _drawi(rng, p["prompt_tokens"]), False),)
            yield Arrival(t, region, sum(s[1] for s in segs), _drawi(rng, p["output_tokens"]), segs,
                          src.tenant, src.model, None, src.slo_ttft_ms, i)
        return
    # Sessions: starts are Poisson; their steps are merged in time order through a heap.
    agent = kind == "agent_sessions"
    pending: list[tuple[float, int, Arrival]] = []
    seq = 0
    for n, t0 in enumerate(_times(rng, rate, src, end)):
        while pending and pending[0][0] <= t0:
            yield heapq.heappop(pending)[2]
        sys_n = max(1, int(p["system_prompts"]))
        sys_len = _drawi(rng, p["system_prompt_tokens"]) if not isinstance(p["system_prompt_tokens"], list) \
            else int(p["system_prompt_tokens"][0])  # a shared prompt has one length
        sys_seg = (_key("system", kind, src.tenant, rng.randrange(sys_n), sys_len), sys_len, True)
        steps = _drawi(rng, p["steps" if agent else "turns"])
        sid = f"{kind}-{i}-{region}-{n}" if steps > 1 else None
        hist_key = _key("history", kind, i, region, n)
        hist = _drawi(rng, p["user_tokens"])
        t = t0
        for k in range(steps):
            if t >= end:
                break
            out = _drawi(rng, p["output_tokens"])
            segs = (sys_seg, (hist_key, hist, steps > 1))
            seq += 1
            heapq.heappush(pending, (t, seq, Arrival(t, region, sys_len + hist, out, segs, src.tenant,
                                                     src.model, sid, src.slo_ttft_ms, i)))
            hist += out + _drawi(rng, p["tool_tokens"] if agent else p["user_tokens"])
            t += _draw(rng, p["step_gap_s" if agent else "think_s"])
    while pending:
        yield heapq.heappop(pending)[2]
