"""A sliding window of demand: arrivals and tokens by client region and model, per second.

Whoever sees requests (the simulator's admit hook, the router actor) calls
`arrival`; whoever sees the engines' prefix-cache counters calls `cache`
with their running totals. `demand(now)` averages the last `window_s`
seconds into `Demand`s for the policy, with their trend: the least-squares
slope of the per-second arrival counts over the window's whole seconds, as a
share of the mean rate. (Until 2026-11-29 it compared the later half with the
earlier half, and the half boundary gave the later half one second more: a flat
rate read as +0.9 %/s over a 15 s window, so every region looked as if it were
growing.) Arrivals are bucketed by second, so
memory and cost are per second of window, not per request.
"""

from __future__ import annotations

import math
from collections import deque

from serving.autoscaler.model import Demand


class DemandWindow:
    def __init__(self, window_s: float = 60.0):
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._buckets: deque[tuple[int, dict[tuple[str, str], list[float]]]] = deque()
        self._cache: dict[str, deque[tuple[float, int, int]]] = {}  # model -> (t, queries, hits)
        self._start: float | None = None

    def arrival(self, t: float, client_region: str, model: str, prompt_tokens: int, output_tokens: int) -> None:
        if self._start is None:
            self._start = t
        sec = int(t)
        if not self._buckets or self._buckets[-1][0] != sec:
            self._buckets.append((sec, {}))
        row = self._buckets[-1][1].setdefault((client_region, model), [0.0, 0.0, 0.0])
        row[0] += 1
        row[1] += prompt_tokens
        row[2] += output_tokens

    def cache(self, t: float, model: str, queries_total: int, hits_total: int) -> None:
        """Running totals of prompt tokens looked up and found in the engines' prefix caches."""
        q = self._cache.setdefault(model, deque())
        q.append((t, queries_total, hits_total))
        while len(q) > 2 and q[1][0] <= t - self.window_s:
            q.popleft()

    def cached_frac(self, model: str) -> float:
        q = self._cache.get(model)
        if not q or len(q) < 2:
            return 0.0
        dq, dh = q[-1][1] - q[0][1], q[-1][2] - q[0][2]
        return min(1.0, max(0.0, dh / dq)) if dq > 0 else 0.0

    def demand(self, now: float) -> dict[str, dict[str, Demand]]:
        """model -> client region -> Demand, averaged over the window (or what was seen of it)."""
        while self._buckets and self._buckets[0][0] < now - self.window_s:
            self._buckets.popleft()
        span = min(self.window_s, now - self._start) if self._start is not None else 0.0
        if span <= 0:
            return {}
        sums: dict[tuple[str, str], list[float]] = {}
        for _, rows in self._buckets:
            for key, (n, p, o) in rows.items():
                s = sums.setdefault(key, [0.0, 0.0, 0.0])
                s[0] += n
                s[1] += p
                s[2] += o
        # The trend: seconds wholly inside the window (the current one is still filling).
        first, last = math.ceil(now - span), math.floor(now) - 1
        counts = {sec: rows for sec, rows in self._buckets if first <= sec <= last}
        xs = range(first, last + 1)
        k = len(xs)
        x_mean = (first + last) / 2
        sxx = sum((x - x_mean) ** 2 for x in xs)
        out: dict[str, dict[str, Demand]] = {}
        for key, (n, p, o) in sums.items():
            growth = 0.0
            if n >= 10 and k >= 4:
                ys = [counts[x].get(key, (0.0,))[0] if x in counts else 0.0 for x in xs]
                y_mean = sum(ys) / k
                if y_mean > 0:
                    slope = sum((x - x_mean) * y for x, y in zip(xs, ys)) / sxx
                    growth = slope / y_mean  # relative change of the rate per second
            client, model = key
            out.setdefault(model, {})[client] = Demand(n / span, p / span, o / span, self.cached_frac(model),
                                                       growth)
        return out
