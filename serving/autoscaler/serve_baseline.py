"""Ray Serve's default autoscaling policy (`target_ongoing_requests`), modelled for the simulator.

One instance per deployment, i.e. per region and model, as Serve scales each
deployment on its own. Every control period (Serve's controller loop):

    ongoing  = mean over look_back_period_s of the requests at the replicas
    desired  = ongoing / target_ongoing_requests               (0 replicas: unchanged)
    smoothed = ceil(running + factor * (desired - running))    (upscaling_factor or
               downscaling_factor; a stuck downscale still drops by one)
    target   = smoothed once the wish to go that way has held
               upscale_delay_s (up) or downscale_delay_s (down); clamped to min/max

which is what ray.serve.autoscaling_policy does in 2.60 (scaling factors,
then the timestamped delay logic). Serve knows nothing of other regions or a
global budget; the simulator caps its ups by the budget left, as a cluster
out of GPUs would leave the new replicas pending.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServeConfig:
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0
    upscaling_factor: float = 1.0
    downscaling_factor: float = 1.0
    min_replicas: int = 0
    max_replicas: int = 1 << 20


class ServeDeploymentScaler:
    def __init__(self, cfg: ServeConfig):
        if cfg.target_ongoing_requests <= 0:
            raise ValueError("target_ongoing_requests must be > 0")
        self.cfg = cfg
        self.samples: deque[tuple[float, float]] = deque()
        self.direction = 0  # +1 wanting up, -1 wanting down
        self.since: float | None = None

    def record(self, now: float, ongoing: float) -> None:
        self.samples.append((now, ongoing))
        while self.samples and self.samples[0][0] < now - self.cfg.look_back_period_s:
            self.samples.popleft()

    def decide(self, now: float, running: int, target: int) -> int:
        cfg = self.cfg
        if running == 0 or not self.samples:
            desired = target
        else:
            ongoing = sum(v for _, v in self.samples) / len(self.samples)
            wanted = ongoing / cfg.target_ongoing_requests
            factor = cfg.upscaling_factor if wanted > running else cfg.downscaling_factor
            desired = math.ceil(running + factor * (wanted - running))
            if math.ceil(wanted) < running and desired == running:
                desired -= 1
        desired = min(cfg.max_replicas, max(cfg.min_replicas, desired))
        if desired == target:
            self.direction, self.since = 0, None
            return target
        direction = 1 if desired > target else -1
        if direction != self.direction:
            self.direction, self.since = direction, now
        delay = cfg.upscale_delay_s if direction > 0 else cfg.downscale_delay_s
        if now - self.since + 1e-6 >= delay:
            self.direction, self.since = 0, None
            return desired if direction > 0 else max(1, desired) if target > 1 else desired
        return target
