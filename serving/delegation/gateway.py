"""Delegation wired into the ingress pipeline's delegation seam.

`TierDelegation.resolve(job)`: for the alias (`auto`), build the rule features
from the request, ask the router for the large tier's predicted TTFT (with the
request's own allowed regions, so residency bounds the prediction too), choose
a tier, and return the job bound to that tier's model with the choice in
`job.reply_headers` (x-proxima-tier, -reason, -detail) and the metrics.

The request's TTFT SLO comes from `x-proxima-slo-ttft-ms`, else the config's
`slo_ttft_ms`. `predict(RouteRequest) -> ms` is the router port's dry-run
(choose without booking).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Awaitable, Callable

from serving.delegation.cascade import is_json_format, passes_check
from serving.delegation.tiers import HEADER, DelegationConfig, Features, choose_tier
from serving.errors import ContextLengthExceeded, InvalidRequest, NoReplicaAvailable
from serving.types import RouteRequest

SLO_HEADER = "x-proxima-slo-ttft-ms"
CHECK_HEADER = "x-proxima-tier-check"  # the small answer must pass this check (cascade)

Predict = Callable[[RouteRequest], Awaitable[float]]
# (job, model) -> the job with `model`'s own prompt ids (its tokenizer and template; the gateway
# sets it): the prompt rules count the small tier's own tokens, not the alias's word ids
TokenizeFor = Callable[[Any, str], Awaitable[Any]]


class TierDelegation:
    def __init__(self, cfg: DelegationConfig, predict: Predict, slo_ttft_ms: float | None = None,
                 on_choice: Callable[[str, str], None] | None = None):
        self.cfg, self.predict, self.slo_ttft_ms = cfg, predict, slo_ttft_ms
        self.on_choice = on_choice
        self.aliases = frozenset({cfg.alias})
        self.tokenize_for: TokenizeFor | None = None

    async def resolve(self, job: Any) -> Any:
        if job.model != self.cfg.alias:
            return job
        headers = dict(job.headers)
        slo = self._slo(headers.get(SLO_HEADER))
        p = job.parsed
        small = self.cfg.tier(self.cfg.small)
        as_small = job  # the prompt as the small tier counts it (an alias comes with word ids)
        small_tokens = job.prompt_tokens
        if self.tokenize_for is not None and headers.get(HEADER) is None:
            try:
                as_small = await self.tokenize_for(job, small.model)
                small_tokens = as_small.prompt_tokens
            except ContextLengthExceeded:  # too long to tokenize for the small tier: long_prompt
                as_small, small_tokens = job, 2**31
        f = Features(small_tokens, has_tools=bool(getattr(p, "tools", False)),
                     json_format=is_json_format(getattr(p, "response_format", None)),
                     header_tier=headers.get(HEADER), slo_ttft_ms=slo, stream=p.stream,
                     needs_tool_parser=bool(getattr(p, "tools", False))
                     and getattr(p, "tool_choice", None) == "auto")
        large = self.cfg.tier(self.cfg.large)
        predicted: float | None = None
        try:  # asked up front: choose_tier is sync, the router port is async
            predicted = await self.predict(replace(job.route_request(), model=large.model,
                                                   slo_ttft_ms=slo, request_id=job.request_id + "?"))
            unavailable = None
        except NoReplicaAvailable as e:
            unavailable = e

        def predict_large() -> float:
            if unavailable is not None:
                raise unavailable
            assert predicted is not None
            return predicted

        choice = choose_tier(self.cfg, f, predict_large)
        if self.on_choice is not None:
            self.on_choice(choice.tier, choice.reason)
        extra = tuple(choice.headers().items())
        if choice.check_then_large:
            extra += ((CHECK_HEADER, p.response_format["type"]),)
        base = as_small  # the small tier's ids: kept if the tier chosen reads them the same (one tokenizer)
        return replace(base, model=choice.model, reply_headers=job.reply_headers + extra)

    def cascade(self, job: Any, text: str) -> Any | None:
        """The job to redo on the large tier if this small answer fails its check, else None.

        The redo goes through admission again: the tenant is billed for both
        attempts' real usage (the discarded one was real work too).
        """
        h = dict(job.reply_headers)
        if CHECK_HEADER not in h or passes_check(job.parsed.response_format, text):
            return None
        large = self.cfg.tier(self.cfg.large)
        note = {"x-proxima-tier": large.name, "x-proxima-tier-reason": "cascade",
                "x-proxima-tier-detail": f"{h['x-proxima-tier']} answer failed the {h[CHECK_HEADER]} check"}
        kept = tuple((k, v) for k, v in job.reply_headers if k not in note and k != CHECK_HEADER)
        if self.on_choice is not None:
            self.on_choice(large.name, "cascade")
        return replace(job, model=large.model, request_id=job.request_id + "-cascade",
                       block_hashes=(), reply_headers=kept + tuple(note.items()))

    def _slo(self, raw: str | None) -> float | None:
        if raw is None:
            return self.slo_ttft_ms
        try:
            v = float(raw)
        except ValueError:
            v = -1.0
        if not v > 0:
            raise InvalidRequest(f"`{SLO_HEADER}` must be a positive number of milliseconds.",
                                 param=SLO_HEADER)
        return v
