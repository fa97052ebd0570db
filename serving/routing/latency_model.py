"""Predicted engine-side time to first token, from a step-time profile.

For a replica running `n` decode sequences with `Q` prompt tokens queued ahead
of us and a per-step token budget `B` (profile a, b, c; see engines.profiles):

    step0      = a + c * n                       # cost of a step, before prefill
    queue_ms   = (ceil(Q / B) * step0 + b * Q) * s
    prefill_ms = (max(1, ceil(u / B)) * step0 + b * u) * s      u = uncached tokens

`s` is the replica's online correction: an EWMA of observed / predicted
engine-side TTFT, clamped, so a replica that is slower than its profile (a
noisy neighbour, a smaller GPU, a CPU engine) is predicted slower.

A replica whose KV cache cannot hold the queue ahead plus the prompt admits
it only as running requests end; the router (Router.context) then predicts
the queue as the longer of `queue_ms` and that wait for KV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from serving.engines.profiles import EngineProfile


@dataclass(slots=True)
class ReplicaPerf:
    profile: EngineProfile
    scale: float = 1.0
    observations: int = 0

    def step0_ms(self, num_running: int) -> float:
        p = self.profile
        return p.a_ms + p.c_ms_per_seq * min(num_running, p.max_num_seqs)

    def queue_ms(self, queued_tokens: int, num_running: int, num_waiting: int = 0) -> float:
        p = self.profile
        steps = -(-queued_tokens // p.max_num_batched_tokens)
        # Sequences over max_num_seqs must wait for a slot: each waits about one step.
        over = max(0, num_running + num_waiting - p.max_num_seqs)
        return (steps * self.step0_ms(num_running) + p.b_ms_per_token * queued_tokens
                + over * self.step0_ms(num_running)) * self.scale

    def prefill_ms(self, uncached_tokens: int, num_running: int) -> float:
        p = self.profile
        steps = max(1, -(-uncached_tokens // p.max_num_batched_tokens))
        return (steps * self.step0_ms(num_running) + p.b_ms_per_token * uncached_tokens) * self.scale

    def observe(self, predicted_engine_ms: float, observed_engine_ms: float,
                alpha: float = 0.1, lo: float = 0.2, hi: float = 10.0, prior: int = 4) -> None:
        """Refine the scale from one observed TTFT (engine side, RTT removed).

        A geometric mean of the ratios, shrunk toward the profile (worth `prior`
        observations), becoming an EWMA once `1/alpha` weight is reached. Why not
        take the first ratio outright: on real engines one TTFT that queued behind
        a prefill the router could not see reads 10x, which pinned that replica at
        10x and starved it of the traffic that would have corrected it.
        """
        if predicted_engine_ms <= 0.5 or observed_engine_ms <= 0:
            return
        raw = predicted_engine_ms / self.scale  # what the profile alone predicted
        ratio = min(hi, max(lo, observed_engine_ms / raw))
        w = max(alpha, 1.0 / (self.observations + 1 + prior))
        self.scale = math.exp((1 - w) * math.log(self.scale) + w * math.log(ratio))
        self.observations += 1
