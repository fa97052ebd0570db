"""The request pipeline, stage by stage, over two ports (router, engines).

    ingress      app.py: HTTP -> openai_api.Parsed, auth -> Principal, client region
    prepare      tokenize (word tokenizer), default/validate max_tokens, model known?
    admission    `Admission.admit(job) -> ticket` (default: admit all)
    delegation   `Delegation.resolve(job) -> job` (default: the model as named)
    bind         the final model's own tokenizer and chat template if configured
                 (hf_tokenizer, on the gateway's tokenizer thread; engines then get ids),
                 context-length check, block hashes
    routing      RouterPort.route(RouteRequest) -> Decision (the central router)
    dispatch     EnginePort.open(decision, GenerateRequest) -> chunks (each of `n`
                 choices its own engine request: stream.Choices), through
                 serving.failover.stream_with_failover: another replica before the
                 first token (RouteRequest.exclude), continuation after it
    accounting   Stream: router.finished, Admission.settle(ticket, used) (once for
                 all choices), metrics

The seams: admission and delegation are objects passed to `Gateway(...)`
(serving/admission and serving/delegation plug in there); failover policy is
`RetryPolicy`; the ports are implemented over Ray in serving/ray/ and
in-process (serving.ingress.local) for tests. RTT injection: with
`serve.inject_rtt`, dispatch sleeps rtt/2 before opening the engine stream
(request leg) and rtt/2 before passing on the first chunk (response leg), so
the configured geography shows up whole in the measured TTFT; later chunks are
not delayed again (a constant delay would only shift them).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable, Iterable, Protocol, TypeVar

from serving.admission.gateway import narrow
from serving.admission.residency import HEADER as REGIONS_HEADER, parse_regions
from serving.admission.tenancy import cache_salt
from serving.config import Config
from serving.engines.base import Chunk, GenerateRequest
from serving.delegation.cascade import is_json_format
from serving.engines.tokenizer import VOCAB_SIZE, encode, piece
from serving.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound, quoted
from serving.failover import RetryPolicy
from serving.ingress.answer import AnswerReader
from serving.ingress.auth import Authenticator, Principal
from serving.ingress.hf_tokenizer import HFTokenizer
from serving.ingress.metrics import GatewayMetrics
from serving.ingress.openai_api import Parsed
from serving.ingress.tools import reads_tags
from serving.observability.observer import LocalTelemetry, Observer, Telemetry
from serving.observability.otel import make_tracer
from serving.observability.steps import SESSION_HEADER, STEP_HEADER, check_headers
from serving.observability.tracing import TraceContext
from serving.prefix.hashing import block_hashes
from serving.types import Decision, RouteRequest

log = logging.getLogger(__name__)
_T = TypeVar("_T")


# The most prompt log-probability entries (tokens x alternatives x choices) an `echo` may ask
# for: about 8 MB of JSON (an evaluation harness scoring a 32k-token prompt with logprobs 5 is 200k)
MAX_ECHO_LOGPROBS = 262_144
# Characters a model's token spans at most, for refusing a prompt before tokenizing it: real
# tokenizers average ~4 and their longest tokens (runs of spaces or '=') are far below 64
MAX_CHARS_PER_TOKEN = 64

class RouterPort(Protocol):
    async def route(self, req: RouteRequest) -> Decision: ...

    def first_token(self, request_id: str, engine_ttft_ms: float | None) -> None: ...

    def finished(self, request_id: str, ok: bool) -> None: ...

    async def stats(self) -> dict[str, Any]: ...


class EnginePort(Protocol):
    def open(self, decision: Decision, gen: GenerateRequest) -> AsyncIterator[Chunk]: ...


@dataclass(frozen=True, slots=True)
class Job:
    """One request between stages: everything routing and dispatch need, computed once."""

    request_id: str
    parsed: Parsed
    principal: Principal
    client_region: str
    model: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    block_hashes: tuple[int, ...] = ()
    cache_salt: str | None = None
    session_id: str | None = None
    headers: tuple[tuple[str, str], ...] = ()  # request headers later stages may read (x-session-id, ...)
    reply_headers: tuple[tuple[str, str], ...] = ()  # stages' notes for the response (x-proxima-tier, ...)
    trace: TraceContext | None = None  # W3C trace context: the gateway's span of this request
    created: float = 0.0  # wall-clock time the request arrived (step records)
    # perf_counter when the ingress got the request (0: unknown): TTFT and e2e count from here,
    # so they hold what the client waited for before routing too (body, admission, delegation)
    arrived: float = 0.0
    tokens_of: str | None = None  # whose tokenizer made prompt_token_ids (None: the word tokenizer)
    tool_parser: str | None = None  # the final model's (bind): how its answer is read for tool calls
    reasoning_parser: str | None = None  # and for its reasoning
    choice: int = 0  # which of the request's n choices (serving.ingress.stream.Choices)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_budget(self) -> int:
        """The most tokens the request's answers may take together (max_tokens each of n)."""
        return self.max_tokens * self.parsed.n

    @property
    def model_tokens(self) -> bool:
        """prompt_token_ids are a model's own: the engine gets them, not text."""
        return self.tokens_of is not None

    def route_request(self) -> RouteRequest:
        return RouteRequest(self.request_id, self.model, self.prompt_tokens, self.block_hashes,
                            self.max_tokens, self.client_region, self.principal.allowed_regions,
                            self.principal.tenant, self.session_id)

    def generate_request(self) -> GenerateRequest:
        p = self.parsed
        text = None if self.model_tokens else p.prompt or None
        sampling = p.sampling
        if reads_tags(p.tool_choice, self.tool_parser):  # the call tags must reach the parser
            sampling += (("skip_special_tokens", False),)
        rf = p.tool_format or (p.response_format if is_json_format(p.response_format) else None)
        seed = None if p.seed is None else p.seed + self.choice  # vLLM's seeds for the choices of n
        return GenerateRequest(self.request_id, self.prompt_token_ids, text, self.max_tokens,
                               self.model, self.cache_salt, p.temperature, p.top_p, seed, p.stop,
                               ignore_eos=p.ignore_eos, sampling=sampling, block_hashes=self.block_hashes,
                               response_format=rf, structured_outputs=p.structured_outputs, logprobs=p.logprobs,
                               prompt_logprobs=p.logprobs if p.echo else None, return_prompt_ids=p.return_token_ids,
                               trace_headers=self.trace_headers())

    def reader(self) -> AnswerReader | None:
        """The reader of this answer's reasoning and tool calls (None: the answer is content)."""
        return AnswerReader.make(self.parsed, self.tool_parser, self.reasoning_parser)

    def trace_headers(self) -> tuple[tuple[str, str], ...]:
        """What the engines get: our traceparent (and tracestate), the session and step."""
        h = self.trace.headers() if self.trace is not None else ()
        return h + tuple((k, v) for k, v in self.headers if k == SESSION_HEADER or k == STEP_HEADER)


class Admission:
    """Default admission: everyone is admitted, nothing to settle."""

    async def admit(self, job: Job) -> Any:
        return None

    async def settle(self, job: Job, ticket: Any, used_tokens: int) -> None:
        return None

    async def drain(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for settlements still going on; return how many are left."""
        return 0


class Delegation:
    """Default delegation: the model is the one named; no aliases."""

    aliases: frozenset[str] = frozenset()

    async def resolve(self, job: Job) -> Job:
        return job


_RID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Gateway:
    def __init__(self, config: Config, router: RouterPort, engines: EnginePort, *,
                 admission: Admission | None = None, delegation: Delegation | None = None,
                 metrics: GatewayMetrics | None = None,
                 tokenizer: Callable[[str], list[int]] = encode,
                 retry: RetryPolicy | None = None, failover: Any = None,
                 telemetry: Telemetry | None = None, tracer: Any = None):
        self.config = config
        self.router, self.engines = router, engines
        self.admission = admission or Admission()
        self.delegation = delegation or Delegation()
        if hasattr(self.delegation, "tokenize_for"):  # its prompt rules count a tier's own tokens
            self.delegation.tokenize_for = self._tokenized_for
        self.failover = failover  # serving.failover.gateway.CircuitFeed: attempts feed the breakers
        self.metrics = metrics or GatewayMetrics()
        obs = config.observability
        self.telemetry = telemetry or LocalTelemetry(obs.max_sessions, obs.max_steps_per_session)
        self.observer = Observer(self.metrics, self.telemetry, tracer or make_tracer(obs), obs.access_log)
        self.tokenizer = tokenizer
        self.retry = retry or RetryPolicy(max_attempts=config.serve.retry_attempts)
        self.auth = Authenticator(config.auth)
        self.rtt = config.rtt()
        self.inject_rtt = config.serve.inject_rtt
        self.block_size = config.block_size
        self.limits = {m.name: config.max_model_len(m.name) for m in config.models}
        self.default_max = {m.name: m.default_max_tokens for m in config.models}
        by_path: dict[str, HFTokenizer] = {}  # models with one tokenizer share it (and its ids)
        for m in config.models:
            if m.tokenizer and m.tokenizer not in by_path:
                by_path[m.tokenizer] = HFTokenizer(m.tokenizer)
        self.hf = {m.name: by_path[m.tokenizer] for m in config.models if m.tokenizer}
        # one thread: a tokenizer is not safe to share across threads, and its caches are not locked
        self._tokenizing = ThreadPoolExecutor(1, "proxima-tokenize") if self.hf else None
        self._salt_key = config.auth.salt_secret()  # the HMAC key of the tenants' cache salts
        self.parsers = {m.name: (m.tool_parser, m.reasoning_parser) for m in config.models}

    async def aclose(self, timeout_s: float = 10.0) -> None:
        """The replica is stopping: finish the charges of requests already answered and
        hand over the telemetry still buffered, within `timeout_s` together."""
        deadline = time.monotonic() + timeout_s
        left = await self.admission.drain(timeout_s)
        if left:
            log.error("stopping with %d budget charge(s) not recorded by the ledger; their holds "
                      "expire at the ledger's TTL", left)
        await self.telemetry.aclose(max(0.5, deadline - time.monotonic()))
        if self._tokenizing is not None:
            self._tokenizing.shutdown(wait=False)

    def model_names(self) -> list[str]:
        return [m.name for m in self.config.models] + sorted(self.delegation.aliases)

    @staticmethod
    def request_id(header: str | None) -> str:
        """`header` if it is a sane id (1-128 of [A-Za-z0-9._:-]), else a fresh one."""
        return header if header and _RID.match(header) else uuid.uuid4().hex

    def client_region(self, header: str | None) -> str:
        if not header:
            return self.config.home_region
        if header not in self.config.regions:
            raise InvalidRequest(f"Unknown client region {quoted(header)} in x-client-region; known: "
                                 f"{sorted(self.config.regions)}.", param="x-client-region")
        return header

    # --- stages ------------------------------------------------------------
    def prepare(self, parsed: Parsed, principal: Principal, client_region: str, request_id: str,
                headers: tuple[tuple[str, str], ...] = (), arrived: float | None = None) -> Job:
        """The model must be configured (or an alias delegation resolves). Word ids for a model
        without its own tokenizer (and for an alias: admission and delegation count them);
        a model with one is tokenized by `start`, on the tokenizer thread. `arrived`: when the
        ingress got the request (perf_counter; default now), where its TTFT starts."""
        if parsed.model not in self.limits and parsed.model not in self.delegation.aliases:
            raise ModelNotFound(f"The model {quoted(parsed.model)} does not exist.", param="model")
        if parsed.prompt_token_ids and parsed.model in self.limits:
            self.check_ids(parsed.model, parsed.prompt_token_ids, "prompt")
        ids = parsed.prompt_token_ids or (() if parsed.model in self.hf else tuple(self.tokenizer(parsed.prompt)))
        max_tokens = parsed.max_tokens
        if max_tokens is None:
            max_tokens = self.default_max.get(parsed.model, 256)
        h = dict(headers)
        check_headers(h.get(SESSION_HEADER), h.get(STEP_HEADER))
        unknown = sorted((parse_regions(h.get(REGIONS_HEADER)) or frozenset()) - self.config.regions.keys())
        if unknown:  # a typo must not read as "no replica in your regions" (503)
            raise InvalidRequest(f"Unknown region(s) {', '.join(map(quoted, unknown[:8]))}"
                                 f"{' and more' if len(unknown) > 8 else ''} in {REGIONS_HEADER}; known: "
                                 f"{sorted(self.config.regions)}.", param=REGIONS_HEADER)
        principal = narrow(principal, h.get(REGIONS_HEADER))  # residency: a header only narrows
        trace = self.observer.tracer.start(h.get("traceparent"), h.get("tracestate"))
        return Job(request_id, parsed, principal, client_region, parsed.model, tuple(ids), max_tokens,
                   cache_salt=self._salt(principal), session_id=h.get(SESSION_HEADER), headers=headers,
                   trace=trace, created=time.time(),
                   arrived=time.perf_counter() if arrived is None else arrived)

    def context_limit(self, model: str) -> int:
        """A served model's context length; a model not served (an alias either) is a 404."""
        limit = self.limits.get(model)
        if limit is None:
            raise ModelNotFound(f"The model {quoted(model)} does not exist.", param="model")
        return limit

    def _salt(self, principal: Principal) -> str | None:
        tenant = self.config.auth.tenants.get(principal.tenant)
        return cache_salt(principal.tenant, self._salt_key,
                          tenant.cache if tenant is not None else "private")

    async def prompt_tokens(self, parsed: Parsed, principal: Principal) -> list[int]:
        """POST /tokenize: the ids `parsed.model` would get for this prompt (its own tokenizer and
        template, else the word tokenizer's), as vLLM's /tokenize counts them."""
        if parsed.model in self.delegation.aliases and parsed.model not in self.limits:
            raise InvalidRequest(f"{quoted(parsed.model)} picks a model per request; tokenize with a "
                                 "model's own name.", param="model")
        self.context_limit(parsed.model)
        if parsed.model not in self.hf:
            return list(parsed.prompt_token_ids or self.tokenizer(parsed.prompt))
        job = Job("tokenize", parsed, principal, self.config.home_region, parsed.model, (), 0,
                  cache_salt=self._salt(principal))
        return list((await self._off_loop(self.tokenize, job)).prompt_token_ids)

    async def prompt_token_strs(self, parsed: Parsed, ids: list[int]) -> list[str]:
        """Each prompt token's own string (/tokenize's token_strs): the model tokenizer's, or for
        the word tokenizer the prompt's words (its ids are hashes of them)."""
        if parsed.model in self.hf or parsed.prompt_token_ids:
            return await self.token_texts(parsed.model, ids, whole=False)  # type: ignore[return-value]
        return parsed.prompt.split()

    async def token_texts(self, model: str, ids: list[int], whole: bool) -> list[str] | str:
        """The tokens' own strings (whole: False), or the text they decode to (POST /detokenize).
        Ids outside the model's vocabulary are a 400."""
        self.context_limit(model)
        self.check_ids(model, ids, "tokens")
        hf = self.hf.get(model)
        if hf is not None:
            return await self._off_loop(hf.tok.decode if whole else hf.tok.convert_ids_to_tokens, ids)
        # a model served by simulated engines: the words they write for these ids
        return "".join(map(piece, ids)) if whole else [piece(t) for t in ids]

    def check_ids(self, model: str, ids: Iterable[int], param: str) -> None:
        """Token ids a client sent must be in the model's vocabulary (400 naming `param`)."""
        hf = self.hf.get(model)
        size = len(hf.tok) if hf is not None else VOCAB_SIZE
        bad = next((t for t in ids if t >= size), None)
        if bad is not None:
            raise InvalidRequest(f"Token id {bad} is out of the vocabulary of {quoted(model)} ({size} tokens).",
                                 param=param)

    def tokenize(self, job: Job) -> Job:
        """The ids of `job.model`'s own tokenizer and template if it has them (the ids vLLM's own
        server would make), else word ids; nothing to do if the ids are already right."""
        hf, p = self.hf.get(job.model), job.parsed
        if hf is not None and job.tokens_of is not None and self.hf.get(job.tokens_of) is hf:
            return replace(job, tokens_of=job.model)  # another model's ids, from the same tokenizer
        if hf is not None and job.tokens_of != job.model:
            limit = self.limits.get(job.model, 0)
            if not p.prompt_token_ids and limit and len(p.prompt) > MAX_CHARS_PER_TOKEN * limit:
                # no tokenizer reads this into the context: refused before it holds the one
                # tokenizer thread (a 15 MB prompt held every other request's tokenizing 25 s)
                raise ContextLengthExceeded(
                    f"The prompt is {len(p.prompt)} characters; this model's maximum context length is {limit} "
                    "tokens, which no prompt that long fits. Please reduce the length of the "
                    f"{'messages' if p.kind == 'chat' else 'prompt'}.", param="messages" if p.kind == "chat" else "prompt")
            ids = (hf.chat(p.messages, p.tools, p.template_kwargs, job.cache_salt) if p.kind == "chat"
                   else p.prompt_token_ids or hf.encode(p.prompt))
            return replace(job, prompt_token_ids=tuple(ids), tokens_of=job.model)
        if hf is None and job.tokens_of is not None:  # another model's ids (a cascade to a tier without)
            return replace(job, prompt_token_ids=p.prompt_token_ids or tuple(self.tokenizer(p.prompt)),
                           tokens_of=None)
        return job

    def fit(self, job: Job, limit: int | None = None) -> Job:
        """The context limit of `job.model` (tokenized; or `limit`), as vLLM's server (0.32)
        applies it: a prompt that leaves no room for one token is a 400; `max_tokens`, the
        client's or the model's default, is cut to the room the prompt leaves (the answer ends
        there with finish_reason "length"); a client's `max_tokens` over the whole context is a
        400 naming it."""
        limit = self.context_limit(job.model) if limit is None else limit
        room = limit - job.prompt_tokens
        if job.parsed.max_tokens is not None and job.parsed.max_tokens > limit:
            name = job.parsed.max_tokens_param
            raise ContextLengthExceeded(f"`{name}` ({job.parsed.max_tokens}) is more than the model's "
                                        f"maximum context length ({limit} tokens).", param=name)
        if job.max_tokens > room > 0:
            return replace(job, max_tokens=room)
        if job.max_tokens > room:
            asked = "" if job.parsed.max_tokens is not None else " (the model's default, as none was given)"
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{job.prompt_tokens + job.max_tokens} tokens ({job.prompt_tokens} in the messages, "
                f"{job.max_tokens} in the completion{asked}). Please reduce the length of the messages "
                "or completion.", param="messages" if job.parsed.kind == "chat" else "prompt")
        p = job.parsed
        if p.echo and p.logprobs is not None and p.n * job.prompt_tokens * (p.logprobs + 1) > MAX_ECHO_LOGPROBS:
            # each choice repeats the prompt's logprobs: a short request could ask for a response
            # of hundreds of MB, built on the ingress's event loop
            raise InvalidRequest(
                f"`echo` with `logprobs` {p.logprobs} and `n` {p.n} asks for {p.n * job.prompt_tokens * (p.logprobs + 1)} "
                f"prompt log-probabilities ({job.prompt_tokens} prompt tokens, each with its alternatives, in each "
                f"choice); at most {MAX_ECHO_LOGPROBS} are given. Lower `n` or `logprobs`: the prompt's are the "
                "same in every choice.", param="n" if p.n > 1 else "logprobs")
        return job

    def _alias_limit(self) -> int:
        """The largest context among the models an alias picks from (all served ones if unknown)."""
        tiers = getattr(getattr(self.delegation, "cfg", None), "tiers", ())
        limits = [self.limits[t.model] for t in tiers if t.model in self.limits]
        return max(limits or self.limits.values())

    def _check_tool_parser(self, job: Job) -> None:
        """vLLM's rule: `tool_choice` auto needs the model's tool parser (its calls would be lost
        as text)."""
        if job.parsed.tool_choice == "auto" and self.parsers[job.model][0] is None:
            raise InvalidRequest(
                f"`tool_choice` \"auto\" (the default with `tools`) needs a tool parser, and model "
                f"{quoted(job.model)} has none configured (models[].tool_parser). Use `tool_choice` "
                "\"required\", a named function or \"none\".", param="tool_choice")

    def bind(self, job: Job) -> Job:
        """The model is final: its own ids (`tokenize`), the context limit, the block hashes."""
        job = self.tokenize(job)
        if job.parsed.max_tokens is None:  # the final model's own default (an alias's tier, a cascade's)
            job = replace(job, max_tokens=self.default_max.get(job.model, 256))
        if job.parsed.prompt_token_ids and job.parsed.model not in self.limits:
            # ids an alias was sent: checked now its model is known (a model's own name: in prepare)
            self.check_ids(job.model, job.parsed.prompt_token_ids, "prompt")
        job = self.fit(job)
        self._check_tool_parser(job)
        tool_parser, reasoning_parser = self.parsers[job.model]
        hashes = block_hashes(job.prompt_token_ids, self.block_size, job.model, job.cache_salt)
        return replace(job, block_hashes=hashes, tool_parser=tool_parser, reasoning_parser=reasoning_parser)

    async def start(self, job: Job) -> "Choices":
        """Admission, delegation, bind, then routing and dispatch of each of the request's
        `n` choices up to its first chunk."""
        from serving.ingress.stream import Choices

        try:
            if job.model in self.hf:  # admission counts the model's own tokens
                job = await self._off_loop(self.tokenize, job)
            # what can never be served is a 400 whatever the budget says (an alias: over the
            # context of every model it picks from)
            job = self.fit(job, None if job.model in self.limits else self._alias_limit())
            if job.model in self.limits:
                self._check_tool_parser(job)
            ticket = await self.admission.admit(job)
        except BaseException as e:
            self.observer.rejected(job, e)
            raise
        admitted = job
        try:
            job = await self.delegation.resolve(job)
            retokenize = job.model in self.hf and job.tokens_of != job.model  # delegation chose another
            job = await self._off_loop(self.bind, job) if retokenize else self.bind(job)
        except BaseException as e:
            await self.admission.settle(job, ticket, 0)
            self.observer.rejected(job, e)
            raise
        if job.prompt_tokens + job.completion_budget > admitted.prompt_tokens + admitted.completion_budget:
            # The tier delegation chose counts the prompt in more tokens than admission did (an
            # alias is admitted on word ids): the hold is made again for what the request can
            # really use, under an id of its own (a settled id is never charged twice).
            await self.admission.settle(admitted, ticket, 0)
            try:
                ticket = await self.admission.admit(replace(job, request_id=job.request_id + "~bound"))
            except BaseException as e:
                self.observer.rejected(job, e)
                raise
        choices = Choices(self, job, ticket)
        await choices.open()
        return choices

    async def _tokenized_for(self, job: Job, model: str) -> Job:
        """`job` with `model`'s own prompt ids (word ids where it has no tokenizer of its own)."""
        job = replace(job, model=model)
        return await self._off_loop(self.tokenize, job) if model in self.hf else self.tokenize(job)

    async def _off_loop(self, fn: Callable[[Any], _T], arg: Any) -> _T:
        """A tokenizer's CPU work, on the tokenizer thread: the event loop goes on serving streams."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, arg)

    def rtt_s(self, client_region: str, region: str) -> float:
        if not self.inject_rtt:
            return 0.0
        return self.rtt.get(client_region, {}).get(region, 0.0) / 1000.0
