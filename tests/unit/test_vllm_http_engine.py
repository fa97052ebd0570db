"""vllm_http engine against a local HTTP fake of vLLM's OpenAI server (aiohttp.web).

The fake speaks vLLM's wire format (SSE completion chunks with token_ids, the
closing usage event with cached tokens, /metrics text); the real server is
covered by tests/e2e.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from serving.engines.base import GenerateRequest
from serving.engines.vllm_http import VLLMHttpEngine
from serving.errors import ContextLengthExceeded, EngineError, InvalidRequest
from serving.types import Health

METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 4096.0
vllm:prefix_cache_queries_created{engine="0",model_name="tiny"} 1.7e+09
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 1024.0
vllm:cache_config_info{block_size="128",engine="0",num_gpu_blocks="64"} 1.0
"""


class FakeVLLM:
    """Just enough of vLLM's server: records request bodies, streams N tokens."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.status = 200
        self.error = ""
        self.cut_after: int | None = None  # drop the connection after this many chunks
        self.stream_error: dict | None = None  # an error event instead of the tokens (after the 200)
        self.disconnected = asyncio.Event()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(request.headers.copy())
        if self.status != 200:
            return web.json_response({"error": {"message": self.error, "type": "BadRequestError"}},
                                     status=self.status)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        if self.stream_error is not None:
            await resp.write(f"data: {json.dumps({'error': self.stream_error})}\n\n".encode())
            return resp
        n, prompt = body["max_tokens"], body["prompt"]
        plen = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        try:
            for i in range(n):
                if self.cut_after is not None and i == self.cut_after:
                    request.transport.close()
                    return resp
                choice = {"index": 0, "text": f" w{i}", "token_ids": [100 + i],
                          "finish_reason": "length" if i == n - 1 else None,
                          "prompt_token_ids": prompt if i == 0 and isinstance(prompt, list) else None}
                usage = {"prompt_tokens": plen, "completion_tokens": i + 1, "total_tokens": plen + i + 1}
                await resp.write(f"data: {json.dumps({'choices': [choice], 'usage': usage})}\n\n".encode())
                await asyncio.sleep(0.01)
            usage = {"prompt_tokens": plen, "completion_tokens": n, "prompt_tokens_details": {"cached_tokens": 128}}
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return resp

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=METRICS)


@pytest.fixture
async def fake():
    f = FakeVLLM()
    app = web.Application()
    app.router.add_post("/v1/completions", f.completions)
    app.router.add_get("/metrics", f.metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    f.url = f"http://127.0.0.1:{port}"
    yield f
    await runner.cleanup()


async def _engine(url: str) -> VLLMHttpEngine:
    e = VLLMHttpEngine("r1", url, region="eu", model="tiny", poll_interval_s=3600)
    await e.start()
    return e


async def test_streams_chunks_and_sends_ids_salt_and_ignore_eos(fake):
    e = await _engine(fake.url)
    try:
        chunks = [c async for c in e.generate(GenerateRequest("q1", (5, 6, 7), max_tokens=3,
                                                              cache_salt="tenant-a", seed=9,
                                                              ignore_eos=True,
                                                              sampling=(("top_k", 40), ("min_p", 0.1)),
                                                              response_format={"type": "json_object"}))]
        [c async for c in e.generate(GenerateRequest("q2", (5,), max_tokens=1,
                                                     structured_outputs={"choice": ["yes", "no"]}))]
    finally:
        await e.close()
    assert fake.bodies[1]["structured_outputs"] == {"choice": ["yes", "no"]}  # vLLM's extension, as set
    body = fake.bodies[0]
    assert (body["prompt"], body["max_tokens"], body["stream"], body["cache_salt"], body["seed"],
            body["ignore_eos"], body["return_token_ids"], body["model"]) == \
        ([5, 6, 7], 3, True, "tenant-a", 9, True, True, "tiny")
    assert (body["top_k"], body["min_p"]) == (40, 0.1) and "presence_penalty" not in body
    assert "temperature" not in body and "top_p" not in body  # unset: the model's generation_config
    assert body["response_format"] == {"type": "json_object"}  # vLLM's structured outputs
    assert fake.headers[0]["X-Request-Id"] == "q1"
    assert [c.token_ids for c in chunks] == [(100,), (101,), (102,)]
    assert [c.finish_reason for c in chunks] == [None, None, "length"]
    assert [c.completion_tokens for c in chunks] == [1, 2, 3]
    assert (chunks[-1].prompt_tokens, chunks[-1].cached_tokens) == (3, 128)  # from the closing usage event


async def test_text_prompt_and_extra_headers_pass_through(fake):
    e = await _engine(fake.url)
    try:
        chunks = [c async for c in e.generate(GenerateRequest("q2", prompt="a b", max_tokens=1,
                                                              temperature=0.0, top_p=0.5),
                                              headers={"x-session-id": "s9"})]
    finally:
        await e.close()
    assert fake.bodies[0]["prompt"] == "a b" and "cache_salt" not in fake.bodies[0]
    assert (fake.bodies[0]["temperature"], fake.bodies[0]["top_p"]) == (0.0, 0.5)  # greedy is sent, not dropped
    assert fake.headers[0]["x-session-id"] == "s9"
    assert chunks[-1].text == " w0"


async def test_snapshot_reads_vllm_metrics(fake):
    e = await _engine(fake.url)
    await e.close()
    s = e.snapshot()
    assert (s.replica_id, s.region, s.model, s.health) == ("r1", "eu", "tiny", Health.UP)
    assert (s.num_running, s.num_waiting, s.kv_usage) == (3, 2, 0.25)
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (4096, 1024)
    assert s.kv_capacity_tokens == 64 * 128  # from cache_config_info


@pytest.mark.parametrize(("status", "message", "error"), [
    pytest.param(400, "This model's maximum context length is 8192 tokens.", ContextLengthExceeded, id="context"),
    pytest.param(400, "temperature must be non-negative", InvalidRequest, id="bad-param"),
    pytest.param(500, "engine crashed", EngineError, id="server-error"),
])
async def test_http_errors_are_translated(fake, status, message, error, caplog):
    """The request's fault is vLLM's own message (its server would show it); an engine's failure
    reaches the client without the engine's text (hosts, internals: found by a review), the log has it."""
    fake.status, fake.error = status, message
    e = await _engine(fake.url)
    try:
        with pytest.raises(error) as info:
            async for _ in e.generate(GenerateRequest("q3", (1,), max_tokens=2)):
                pass
    finally:
        await e.close()
    assert type(info.value) is error
    if error is EngineError:
        assert message not in info.value.message and "r1" in info.value.message and message in caplog.text
    else:
        assert message in info.value.message


@pytest.mark.parametrize(("event", "error"), [
    pytest.param({"message": "Grammar error: Invalid type: banana", "type": "BadRequestError", "code": 400},
                 InvalidRequest, id="grammar"),  # the request's fault: no failover, the replica stays up
    pytest.param({"message": "engine dead", "type": "InternalServerError", "code": 500}, EngineError, id="engine"),
])
async def test_error_events_in_the_stream_are_translated(fake, event, error, caplog):
    fake.stream_error = event
    e = await _engine(fake.url)
    try:
        with pytest.raises(error) as info:
            async for _ in e.generate(GenerateRequest("q4", (1,), max_tokens=2)):
                pass
        assert type(info.value) is error
        assert (event["message"] in info.value.message) == (error is not EngineError)  # an engine's: the log's
        assert event["message"] in caplog.text + info.value.message
        assert e.snapshot().health is Health.UP
    finally:
        await e.close()


async def test_unreachable_server_is_down_and_fails_with_engine_error():
    e = VLLMHttpEngine("r2", "http://127.0.0.1:9", model="tiny", connect_timeout_s=0.5)
    await e.start()
    try:
        assert e.snapshot().health is Health.DOWN
        with pytest.raises(EngineError, match="unreachable") as info:
            async for _ in e.generate(GenerateRequest("q4", (1,), max_tokens=1)):
                pass
        assert "127.0.0.1" not in info.value.message  # the engine's address is the log's, not the client's
    finally:
        await e.close()


async def test_stream_cut_mid_way_is_engine_error_and_marks_down(fake):
    fake.cut_after = 1
    e = await _engine(fake.url)
    got = []
    try:
        with pytest.raises(EngineError):
            async for c in e.generate(GenerateRequest("q5", (1, 2), max_tokens=5)):
                got.append(c)
    finally:
        await e.close()
    assert [c.token_ids for c in got] == [(100,)]
    assert e.snapshot().health is Health.DOWN


async def test_closing_the_iterator_aborts_upstream(fake):
    e = await _engine(fake.url)
    try:
        stream = e.generate(GenerateRequest("q6", tuple(range(300)), max_tokens=500))
        first = await stream.__anext__()
        assert e.pending.tokens == 0  # first token seen: its prefill no longer queues
        await stream.aclose()
        await asyncio.wait_for(fake.disconnected.wait(), 2.0)
    finally:
        await e.close()
    assert first.token_ids == (100,)


async def test_pending_prefill_counts_until_first_token(fake):
    e = await _engine(fake.url)
    try:
        stream = e.generate(GenerateRequest("q7", tuple(range(300)), max_tokens=2))
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the request is sent, no token yet
        assert e.snapshot().waiting_prefill_tokens == 300
        await task
        assert e.snapshot().waiting_prefill_tokens == 0
        await stream.aclose()
    finally:
        await e.close()


async def test_abort_ends_the_stream_with_cancelled_and_keeps_the_replica_up(fake):
    e = await _engine(fake.url)
    try:
        stream = e.generate(GenerateRequest("q8", (1, 2, 3), max_tokens=500))
        await stream.__anext__()
        await e.abort("q8")
        with pytest.raises(asyncio.CancelledError):
            async for _ in stream:
                pass
        await asyncio.wait_for(fake.disconnected.wait(), 2.0)
        assert e.snapshot().health is Health.UP
    finally:
        await e.close()
