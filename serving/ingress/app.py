"""The OpenAI-compatible ASGI app (Starlette) over a Gateway.

    POST /v1/chat/completions   POST /v1/completions   (SSE when "stream": true)
    GET  /v1/models             GET  /v1/models/{model}  (max_model_len, as vLLM's cards)
    GET  /health                GET  /metrics (Prometheus text)
    GET  /v1/budgets            the caller's own token budgets (serving.admission)
    POST /tokenize              POST /detokenize  (vLLM's: a prompt's tokens as the model gets them)
    GET  /admin/router          the router's view (replicas, load, in-flight); admin key
    GET  /v1/sessions/{id}/steps  the caller's own agent session, step by step (404 otherwise)
    GET  /openapi.json          this API as an OpenAPI 3.1 document (serving.ingress.openapi)

Response headers: x-request-id, and where the request went: x-proxima-region,
x-proxima-replica, x-proxima-predicted-ttft-ms. Every error, ours or a
framework's (404, 405), leaves as an OpenAI-style JSON body with its status;
an unexpected exception is a 500 with a generic body (details only in the log).
/metrics is the whole gateway's (serving.observability.fleet), and every
request is counted by route, status, tenant, model and region.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from serving.engines.base import Chunk, TokenLogprob
from serving.errors import InvalidRequest, ModelNotFound, NotFound, ProximaError, RequestTooLarge, quoted
from serving.ingress import sse
from serving.ingress.answer import Part
from serving.ingress.metrics import CONTENT_TYPE
from serving.ingress.openai_api import (Parsed, Responder, parse_chat, parse_completion, parse_detokenize,
                                        parse_tokenize, usage)
from serving.ingress.openapi import openapi_schema
from serving.ingress.pipeline import Gateway, Job
from serving.ingress.stream import Choices, Stream
from serving.ingress.tools import whole_calls
from serving.observability.fleet import PART_TIMEOUT_S, render_gateway
from serving.observability.logs import request_context
from serving.observability.steps import check_headers

log = logging.getLogger("proxima.ingress")
_HEADERS = ("x-session-id", "x-agent-step", "x-proxima-tier", "traceparent", "tracestate",
            "x-proxima-regions", "x-proxima-slo-ttft-ms")
# what a browser page may read of a response (CORS): where its request went, and its id
_EXPOSED = ("x-request-id", "x-proxima-region", "x-proxima-replica", "x-proxima-predicted-ttft-ms",
            "x-proxima-tier", "x-proxima-tier-reason", "x-proxima-tier-detail", "x-proxima-budget", "retry-after")
_NO_LABELS = ("", "", "")  # tenant, model, region: unknown (before auth, or not a completion)


_OFF_LOOP_BYTES = 256 * 1024
_T = TypeVar("_T")


async def _parsed(parse: Callable[[bytes], _T], body: bytes) -> _T:
    """A large body is parsed on a thread: the loop's streams get the interpreter between
    its switches (the parse holds the GIL, so they slow, but no longer stop)."""
    return parse(body) if len(body) < _OFF_LOOP_BYTES else await asyncio.to_thread(parse, body)


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(sse.dumps(obj), status, headers, media_type="application/json")


def _error(e: ProximaError, headers: dict[str, str] | None = None) -> Response:
    return _json(e.body(), e.status, {**e.headers, **(headers or {})})


def build_app(gw: Gateway) -> Starlette:
    m = gw.metrics
    limit = gw.config.serve.max_request_bytes

    async def body_of(request: Request) -> bytes:
        """The request body, read no further than `serve.max_request_bytes` (a larger one is a
        413 before it fills the ingress's memory or its tokenizer's time)."""
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > limit:
            raise RequestTooLarge(f"The request body is {int(size)} bytes; this gateway takes at most {limit}.")
        chunks, got = [], 0
        async for chunk in request.stream():
            got += len(chunk)
            if got > limit:
                raise RequestTooLarge(f"The request body is over {limit} bytes, the most this gateway takes.")
            chunks.append(chunk)
        return b"".join(chunks)

    def counted(route: str, fn: Callable) -> Callable:
        async def handler(request: Request) -> Response:
            try:
                resp = await fn(request)
            except ProximaError as e:
                request.state.error = e.code or e.type
                resp = _error(e)
            except Exception:  # a bug: never leak its text to the client
                log.exception("unhandled error on %s", route)
                resp = _error(ProximaError("The server had an error while processing your request."))
            tenant, model, region = getattr(request.state, "labels", _NO_LABELS)
            status = str(resp.status_code)
            m.requests.labels(route, status, tenant, model, region).inc()
            if resp.status_code >= 400:
                m.errors.labels(route, status, getattr(request.state, "error", "error"), "response",
                                tenant, model, region).inc()
            return resp
        return handler

    async def completions(request: Request, parse: Callable[[bytes], Parsed]) -> Response:
        # Our id is always fresh: bookings, engine requests and budget reservations are
        # keyed by it, so a client must not pick it (a reused id would settle once).
        # The client's own x-request-id, if sane, is only echoed back.
        arrived = time.perf_counter()  # the client's TTFT starts here (metrics, step records)
        rid = gw.request_id(None)
        echo = {"x-request-id": gw.request_id(request.headers.get("x-request-id"))}
        request_context(request_id=echo["x-request-id"], id=rid,
                        session_id=request.headers.get("x-session-id"))
        try:
            principal = gw.auth.authenticate(request.headers.get("authorization"))
            request.state.labels = (principal.tenant, "", "")
            parsed = await _parsed(parse, await body_of(request))
            region = gw.client_region(request.headers.get("x-client-region"))
            extra = tuple((k, v) for k in _HEADERS if (v := request.headers.get(k)) is not None)
            job = gw.prepare(parsed, principal, region, rid, extra + tuple(echo.items()), arrived)
            request.state.labels = (principal.tenant, job.model, "")
            choices = await gw.start(job)
            # completions' `echo`: the prompt's text first (ids: as the chosen model's tokenizer reads
            # them); with return_token_ids vLLM's server echoes no text (the ids are there)
            try:
                shown = "" if not parsed.echo or parsed.return_token_ids else parsed.prompt or \
                    await gw.token_texts(choices.job.model, list(parsed.prompt_token_ids or ()), whole=True)
            except BaseException:
                await choices.aclose()
                raise
        except ProximaError as e:
            request.state.error = e.code or e.type
            return _error(e, echo)
        request.state.labels = labels = _labels(choices)
        # `model` names the model that answers (an alias's tier), as OpenAI names the snapshot
        resp = Responder(parsed.kind, rid, choices.job.model, parsed.include_usage, top_logprobs=parsed.logprobs or 0)
        if parsed.stream:
            if parsed.continuous_usage:
                resp.live_usage = lambda: _usage(choices)
            def in_band(e: ProximaError) -> None:  # after the 200: counted as a stream-phase error
                m.errors.labels(request.url.path, str(e.status), e.code or e.type, "stream", *labels).inc()
            return _SSE(choices, _events(choices, resp, in_band, shown),
                        headers={**choices.headers(), **echo, "cache-control": "no-cache"})
        answers = await _answers(choices, shown)
        # checked on each answer's content (a reasoning model's thinking is not the JSON)
        check = getattr(gw.delegation, "cascade", lambda job, text: None)
        redo = next((r for a in answers if (r := check(choices.job, a.part.content)) is not None), None)
        notes: dict[str, str] = {}
        if redo is not None:  # a small tier's answer failed its check: the large tier redoes the request
            try:
                redone = await gw.start(redo)
                redone_answers = await _answers(redone, shown)
            except ProximaError as e:
                # the redo cannot start (its budget, no large replica) or fails (billed nothing):
                # the small answer, which was billed, is what the client gets, and the headers
                # say why it stands
                detail = dict(choices.job.reply_headers).get("x-proxima-tier-check", "format")
                notes = {"x-proxima-tier-detail": f"the answer failed the {detail} check; the large tier's "
                                                  f"redo {'failed' if e.status >= 500 else 'was refused'} "
                                                  f"({e.code or e.type})"}
            else:
                choices, answers = redone, redone_answers
                request.state.labels = _labels(choices)
                resp.model = choices.job.model
        body = resp.response([resp.choice(i, a.part.content, s.answer_finish_reason, a.part.tool_calls, a.part.reasoning,
                                          a.logprobs, s.stop_reason, a.token_ids, a.prompt_token_ids)
                              for i, (s, a) in enumerate(zip(choices.streams, answers))], _usage(choices),
                             answers[0].prompt_token_ids)
        return _json(body, headers={**choices.headers(), **notes, **echo})

    async def chat(request: Request) -> Response:
        return await completions(request, parse_chat)

    async def completion(request: Request) -> Response:
        return await completions(request, parse_completion)

    def card(name: str, now: int) -> dict[str, Any]:
        """A model as vLLM's server lists it (an alias has no context length of its own)."""
        out: dict[str, Any] = {"id": name, "object": "model", "created": now, "owned_by": "proxima", "root": name}
        if name in gw.limits:
            out["max_model_len"] = gw.limits[name]
        return out

    async def tokenize(request: Request) -> Response:
        """vLLM's POST /tokenize: the prompt's tokens as the model gets them (an agent sizing its
        context); a chat body or a completion body. No engine is involved, no budget charged."""
        principal = gw.auth.authenticate(request.headers.get("authorization"))
        request.state.labels = (principal.tenant, "", "")
        parsed, strs = await _parsed(parse_tokenize, await body_of(request))
        request.state.labels = (principal.tenant, known(parsed.model), "")
        ids = await gw.prompt_tokens(parsed, principal)
        return _json({"count": len(ids), "max_model_len": gw.limits[parsed.model], "tokens": ids,
                      "token_strs": await gw.prompt_token_strs(parsed, ids) if strs else None})

    async def detokenize(request: Request) -> Response:
        """vLLM's POST /detokenize: the text of `tokens`."""
        principal = gw.auth.authenticate(request.headers.get("authorization"))
        request.state.labels = (principal.tenant, "", "")
        r = await _parsed(parse_detokenize, await body_of(request))
        request.state.labels = (principal.tenant, known(r.model), "")
        return _json({"prompt": await gw.token_texts(r.model, r.tokens, whole=True)})

    def known(model: str) -> str:
        """A metric label names a served model, never a client's string (unbounded series)."""
        return model if model in gw.limits or model in gw.delegation.aliases else ""

    async def models(request: Request) -> Response:
        request.state.labels = (gw.auth.authenticate(request.headers.get("authorization")).tenant, "", "")
        now = int(time.time())
        return _json({"object": "list", "data": [card(n, now) for n in gw.model_names()]})

    async def model(request: Request) -> Response:
        tenant = gw.auth.authenticate(request.headers.get("authorization")).tenant
        name = request.path_params["model"]
        request.state.labels = (tenant, known(name), "")
        if name not in gw.model_names():
            raise ModelNotFound(f"The model {quoted(name)} does not exist.", param="model")
        return _json(card(name, int(time.time())))

    async def router_view():
        # Due half-open trials start before the view is read, not only before the next
        # routing decision: an idle gateway (no traffic after an outage) would otherwise
        # keep reporting those replicas down, and a load balancer that trusts /health
        # would keep the traffic away that could close them.
        if gw.failover is not None:
            gw.failover.tick()
        stats = await gw.router.stats()
        if gw.failover is not None and "replicas" in stats:
            gw.failover.view.retain(stats["replicas"])  # the router's membership is the truth
        return stats

    async def health(request: Request) -> Response:
        try:  # a load balancer's probe gets an answer in time, whatever the router is doing
            async with asyncio.timeout(PART_TIMEOUT_S):
                stats = await router_view()
        except Exception as e:  # restarting or stalled: nothing can be routed until it answers
            log.warning("/health: the router did not answer: %s", type(e).__name__)
            return _json({"status": "degraded", "replicas_up": 0, "replicas": None,
                          "router": "unavailable"}, 503)
        up = sum(1 for r in stats.get("replicas", {}).values() if r.get("routable"))
        body = {"status": "ok" if up else "degraded", "replicas_up": up,
                "replicas": len(stats.get("replicas", {}))}
        return _json(body, 200 if up else 503)

    metrics_auth = gw.config.observability.metrics_auth
    if metrics_auth == "open" and not gw.auth.open:
        log.warning("GET /metrics is open, and its samples name every tenant with its usage; on a "
                    "network tenants reach, set observability.metrics_auth: admin")

    async def metrics(request: Request) -> Response:
        if metrics_auth == "admin":
            try:
                gw.auth.require_admin(request.headers.get("authorization"))
            except ProximaError as e:
                return _error(e)
        return Response(await render_gateway(gw), media_type=CONTENT_TYPE)

    async def session_steps(request: Request) -> Response:
        """The caller's own session's steps, oldest first; another tenant's session is a 404."""
        principal = gw.auth.authenticate(request.headers.get("authorization"))
        request.state.labels = (principal.tenant, "", "")
        sid = request.path_params["session_id"]
        body = await gw.telemetry.steps(principal.tenant, sid)
        if body is None:
            raise NotFound(f"No steps recorded for session {sid[:128]!r}.")
        return _json(body)

    async def budgets(request: Request) -> Response:
        """The caller's own budgets (never another tenant's): limits, used, reserved, remaining."""
        principal = gw.auth.authenticate(request.headers.get("authorization"))
        request.state.labels = (principal.tenant, "", "")
        ledger = getattr(gw.admission, "ledger", None)
        if ledger is None:
            raise NotFound("Token budgets are not enabled on this gateway.")
        session = request.headers.get("x-session-id")
        check_headers(session, None)
        return _json(await ledger.remaining(principal.tenant, session))

    async def admin_router(request: Request) -> Response:
        gw.auth.require_admin(request.headers.get("authorization"))
        return _json(await router_view())

    schema = sse.dumps(openapi_schema(gw.model_names(), sorted(gw.config.regions)))

    async def openapi(request: Request) -> Response:
        return Response(schema, media_type="application/json")

    async def not_found(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            e: ProximaError = InvalidRequest(f"Method {request.method} is not allowed on {request.url.path}.")
            e.status = 405
        elif exc.status_code == 404:
            e = NotFound(f"Unknown path {request.url.path}.")
        else:
            e = InvalidRequest(str(exc.detail))
            e.status = exc.status_code
        return _error(e)

    routes = [
        Route("/v1/chat/completions", counted("/v1/chat/completions", chat), methods=["POST"]),
        Route("/v1/completions", counted("/v1/completions", completion), methods=["POST"]),
        Route("/v1/models", counted("/v1/models", models), methods=["GET"]),
        Route("/v1/models/{model:path}", counted("/v1/models/{model}", model), methods=["GET"]),
        Route("/v1/budgets", counted("/v1/budgets", budgets), methods=["GET"]),
        Route("/tokenize", counted("/tokenize", tokenize), methods=["POST"]),
        Route("/detokenize", counted("/detokenize", detokenize), methods=["POST"]),
        Route("/health", counted("/health", health), methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/sessions/{session_id}/steps", counted("/v1/sessions/{id}/steps", session_steps),
              methods=["GET"]),
        Route("/admin/router", counted("/admin/router", admin_router), methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    origins = gw.config.serve.cors_allowed_origins
    middleware = [Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                             allow_headers=["*"], expose_headers=list(_EXPOSED))] if origins else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: not_found})


class _SSE(StreamingResponse):
    """The SSE response of an answer that is open on the engines: however the response ends,
    its streams are closed (engines abort, the router and the budget are settled). A client
    gone before the first byte leaves the body never started, so its own cleanup never runs."""

    def __init__(self, choices: Choices, body: AsyncIterator[bytes], headers: dict[str, str]):
        super().__init__(body, media_type=sse.MEDIA_TYPE, headers=headers)
        self.choices = choices

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self.choices.aclose()


def _labels(choices: Choices) -> tuple[str, str, str]:
    d = choices.stream.decision
    return choices.job.principal.tenant, choices.job.model, d.region if d is not None else ""


def _usage(choices: Choices) -> dict[str, Any]:
    """The request's usage: the prompt once, every choice's completion tokens."""
    return usage(choices.prompt_tokens, choices.completion_tokens, choices.cached_tokens)


@dataclass(slots=True)
class _Answer:
    """One choice's whole answer: what its reader made of it, its tokens' logprobs if asked, and
    with return_token_ids its generated ids and the prompt's (None: not asked, or not shown)."""

    part: Part
    logprobs: list[TokenLogprob] | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: tuple[int, ...] | None = None


def _shows_ids(job: Job) -> tuple[bool, bool]:
    """(prompt ids, generated ids) the response carries: vLLM's return_token_ids; the generated
    ids are left out where a reasoning model's thinking is (include_reasoning false), as vLLM does."""
    p = job.parsed
    if not p.return_token_ids:
        return False, False
    return True, p.include_reasoning or job.reasoning_parser is None or p.kind != "chat"


def _prompt_ids(stream: Stream, c: Chunk) -> tuple[int, ...]:
    """The prompt's ids as the engine read them (its first chunk has them); the gateway's own
    where it sent the model's ids and the engine said nothing."""
    if c.prompt_token_ids is not None:
        return c.prompt_token_ids
    return stream.job.prompt_token_ids if stream.job.model_tokens else ()


async def _answers(choices: Choices, shown: str = "") -> list[_Answer]:
    """Every choice's whole answer, read together; one that fails fails the request (the
    others are closed)."""
    if len(choices.streams) == 1:
        return [await _whole(choices.stream, shown)]
    tasks = [asyncio.ensure_future(_whole(s, shown)) for s in choices.streams]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await choices.aclose()  # one whose task never ran is still open: its engine aborts
        raise


async def _whole(stream: Stream, shown: str = "") -> _Answer:
    """The whole answer: what the stream's reader made of it (the text as content without
    one, after `shown`: an echoed prompt), its tokens' logprobs and ids if asked. The reader sees
    every chunk before the stream is accounted, so the agent-step record has its tool calls."""
    text, part, reader = [shown], Part(), stream.reader
    lps: list[TokenLogprob] | None = None if stream.job.parsed.logprobs is None else []
    show_prompt, show_ids = _shows_ids(stream.job)
    ids: list[int] | None = [] if show_ids else None
    prompt_ids: tuple[int, ...] | None = None
    async with aclosing(stream.chunks()) as chunks:
        async for c in chunks:
            if show_prompt and prompt_ids is None:
                prompt_ids = _prompt_ids(stream, c)
            if ids is not None:
                ids.extend(c.token_ids)
            if lps is not None and c.prompt_logprobs:  # an echoed prompt's, before the answer's
                lps.extend(c.prompt_logprobs)
            if lps is not None and c.logprobs:
                lps.extend(c.logprobs)
            if reader is not None:
                part += reader.take(c.text, c.finish_reason)
            else:
                text.append(c.text)
    if reader is None:
        return _Answer(Part("".join(text)), lps, ids, prompt_ids)
    part += reader.end()  # nothing, unless the engine ended without a finish_reason
    part.tool_calls = whole_calls(part.tool_calls)
    return _Answer(part, lps, ids, prompt_ids)


async def _choice_events(stream: Stream, resp: Responder, shown: str = "") -> AsyncIterator[bytes]:
    """One choice's SSE events: one per engine chunk (fewer while tags or tool calls are held
    back; the first after `shown`, an echoed prompt)."""
    first = True
    reader, index = stream.reader, stream.job.choice
    show_prompt, show_ids = _shows_ids(stream.job)
    held: tuple[TokenLogprob, ...] = ()  # logprobs of tokens whose text is held back
    held_ids: tuple[int, ...] = ()  # and their ids (return_token_ids)
    async with aclosing(stream.chunks()) as chunks:
        async for c in chunks:
            lps = c.logprobs
            if c.prompt_logprobs and lps is not None:  # an echoed prompt's, with its text
                lps = c.prompt_logprobs + lps
            prompt_ids = _prompt_ids(stream, c) if show_prompt and first else None
            ids = (held_ids + c.token_ids) if show_ids else None
            if reader is None:
                text, shown = shown + c.text, ""
                yield sse.event(resp.chunk(text, c.finish_reason, first, logprobs=lps, index=index,
                                           stop_reason=c.stop_reason, token_ids=ids, prompt_token_ids=prompt_ids))
            else:  # reasoning and tool calls are read out of the text as it comes
                part = reader.take(c.text, c.finish_reason)
                reason = reader.finish_reason(c.finish_reason)
                lps = lps if not held else held + (lps or ())
                if not (first or part or reason):
                    held, held_ids = lps or (), ids or ()
                    continue  # held back: it may be the start of a tag or a call
                held, held_ids = (), ()
                calls = whole_calls(part.tool_calls) if len(part.tool_calls) > 1 else part.tool_calls
                yield sse.event(resp.chunk(part.content, reason, first, calls, part.reasoning, lps,  # one entry a call
                                           index=index, stop_reason=c.stop_reason if reason else None,
                                           token_ids=ids, prompt_token_ids=prompt_ids))
            first = False


async def _merged(gens: list[AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
    """The choices' events as they come, each choice's in order; the first error ends them all."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=len(gens))  # a slow client holds the engines back
    end = object()

    async def pump(gen: AsyncIterator[bytes]) -> None:
        try:
            async for event in gen:
                await queue.put(event)
            await queue.put(end)
        except Exception as e:  # to the reader; cancellation just ends the pump
            await queue.put(e)

    tasks = [asyncio.ensure_future(pump(g)) for g in gens]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is end:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _events(choices: Choices, resp: Responder, in_band: Callable[[ProximaError], None],
                  shown: str = "") -> AsyncIterator[bytes]:
    """SSE body: the choices' events (serving one choice without a task in between), the
    usage event if asked, then [DONE]."""
    gens = [_choice_events(s, resp, shown) for s in choices.streams]
    try:
        async with aclosing(gens[0] if len(gens) == 1 else _merged(gens)) as events:
            async for event in events:
                yield event
        if resp.include_usage:
            yield sse.event(resp.usage_chunk(_usage(choices)))
    except ProximaError as e:  # after the first byte the status is sent: report in-band
        in_band(e)
        yield sse.event(e.body())
    except Exception:
        log.exception("stream %s failed", choices.job.request_id)
        e = ProximaError("The server had an error while streaming.")
        in_band(e)
        yield sse.event(e.body())
    finally:
        await choices.aclose()  # a choice not read to its end (an error in another): its engine aborts
    yield sse.DONE
