"""Locust users for the gateway: an agent loop, chat, voice and batch.

    locust -f loadtests/locustfile.py --headless -u 20 -r 5 -t 60s \
        --host http://127.0.0.1:8000 --csv loadtests/out/run
    python -m serving.bench.loadtest loadtests/out/run   # percentiles + SLO pass/fail

(`make loadtest` does both against `make run`'s gateway.) Pick classes by name
on the command line (`... AgentLoopUser`) or by tag weight as usual.

Every streamed call is one locust request named after its user class
("agent", "chat", "voice") whose response time is the whole stream (from
sending the request to [DONE]); the time to the first content token is fired
as a separate request of type "TTFT" under the same name, so locust's CSV and
its summary carry TTFT percentiles per class. Locust counts those rows in its
"Aggregated" line too, so that line shows each streamed call twice (requests,
requests/s and failure ratio): read the per-class rows, or the summary of
`python -m serving.bench.loadtest`, which leaves the TTFT rows out of totals. A stream that ends with an in-band error
event, or without usage and [DONE], or counts tokens it never sent, is a failure.

- AgentLoopUser: sessions of 3-8 steps against one growing context (system
  prompt + task, then each step's answer and a tool result appended), with
  `x-session-id` / `x-agent-step` headers and a tool's latency between steps.
- ChatUser: multi-turn chat with a human's think time between turns.
- VoiceUser: short utterances, short answers, strict TTFT.
- BatchUser: non-streamed /v1/completions with long prompts; throughput, not TTFT.

Environment: LOADTEST_MODEL (default llama3-8b), LOADTEST_API_KEY (Bearer,
when the gateway has keys), LOADTEST_REGIONS (client regions, comma-separated).
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid

from locust import HttpUser, between, events, tag, task

MODEL = os.environ.get("LOADTEST_MODEL", "llama3-8b")
API_KEY = os.environ.get("LOADTEST_API_KEY", "")
REGIONS = [r for r in os.environ.get("LOADTEST_REGIONS", "us-east,eu-west,ap-south").split(",") if r]
WORDS = ("route replica region prefix cache token queue budget tier engine stream agent tool "
         "search plan patch test build deploy fetch parse rank score merge retry").split()


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class GatewayUser(HttpUser):
    """Common plumbing: headers, one streamed chat call with TTFT, one plain call."""

    abstract = True
    kind = "user"

    def on_start(self) -> None:
        self.rng = random.Random()
        self.region = self.rng.choice(REGIONS)

    def headers(self, **extra: str) -> dict[str, str]:
        h = {"x-client-region": self.region, **extra}
        if API_KEY:
            h["authorization"] = f"Bearer {API_KEY}"
        return h

    def stream_chat(self, messages: list[dict], max_tokens: int, **headers: str) -> str | None:
        """One streamed chat completion; returns the answer's text, or None if it failed."""
        body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        ttft = None
        text: list[str] = []
        with self.client.post("/v1/chat/completions", json=body, headers=self.headers(**headers),
                              stream=True, catch_response=True, name=self.kind) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return None
            try:
                usage, done, size = None, False, 0
                for line in r.iter_lines(decode_unicode=True):
                    size += len(line)
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        r.failure(f"in-band error: {ev['error'].get('code')}: {ev['error'].get('message')}")
                        return None
                    for ch in ev.get("choices") or ():
                        piece = (ch.get("delta") or {}).get("content") or ""
                        if piece and ttft is None:
                            ttft = (time.perf_counter() - t0) * 1000.0
                        text.append(piece)
                    usage = ev.get("usage") or usage
            except Exception as e:  # connection dropped mid-stream: the request failed
                r.failure(f"stream broken: {type(e).__name__}: {e}")
                return None
            r.request_meta["response_time"] = (time.perf_counter() - t0) * 1000.0
            r.request_meta["response_length"] = size
            answer = "".join(text)
            if not done or usage is None:
                r.failure("stream ended without usage and [DONE]")
                return None
            if ttft is None and usage["completion_tokens"] > 0:
                r.failure("tokens counted but no content arrived")
                return None
            r.success()
        if ttft is not None:
            events.request.fire(request_type="TTFT", name=self.kind, response_time=ttft,
                                response_length=0, exception=None, context={})
        return answer


class AgentLoopUser(GatewayUser):
    """An agent: plan, call a tool, read its result, act again, on one growing context."""

    kind = "agent"
    weight = 4
    wait_time = between(0.5, 2.0)  # between sessions
    tool_latency_s = (0.05, 0.6)  # a search, a file read, a test run

    @task
    @tag("agent")
    def session(self) -> None:
        sid = uuid.uuid4().hex[:16]
        messages = [{"role": "system", "content": "You are a coding agent. " + words(300, self.rng)},
                    {"role": "user", "content": "Task: " + words(60, self.rng)}]
        for step in range(self.rng.randint(3, 8)):
            answer = self.stream_chat(messages, self.rng.randint(16, 64),
                                      **{"x-session-id": sid, "x-agent-step": str(step)})
            if answer is None:
                return  # the session is broken; locust counted the failure
            messages.append({"role": "assistant", "content": answer})
            time.sleep(self.rng.uniform(*self.tool_latency_s))  # gevent-patched: yields
            messages.append({"role": "tool", "content": "result: " + words(self.rng.randint(20, 200), self.rng)})


class ChatUser(GatewayUser):
    kind = "chat"
    weight = 3
    wait_time = between(1.0, 4.0)  # a person reading and typing

    def on_start(self) -> None:
        super().on_start()
        self.messages = [{"role": "system", "content": "You are a helpful assistant."}]

    @task
    @tag("chat")
    def turn(self) -> None:
        if len(self.messages) > 16:  # a new conversation
            self.messages = self.messages[:1]
        self.messages.append({"role": "user", "content": words(self.rng.randint(8, 40), self.rng)})
        answer = self.stream_chat(self.messages, self.rng.randint(32, 128))
        if answer is None:
            self.messages = self.messages[:1]
        else:
            self.messages.append({"role": "assistant", "content": answer})


class VoiceUser(GatewayUser):
    kind = "voice"
    weight = 2
    wait_time = between(0.5, 2.0)

    @task
    @tag("voice")
    def utterance(self) -> None:
        self.stream_chat([{"role": "system", "content": "Answer in one short spoken sentence."},
                          {"role": "user", "content": words(self.rng.randint(4, 16), self.rng)}],
                         self.rng.randint(8, 24))


class BatchUser(GatewayUser):
    kind = "batch"
    weight = 1
    wait_time = between(0.0, 0.5)

    @task
    @tag("batch")
    def document(self) -> None:
        body = {"model": MODEL, "prompt": "Summarize: " + words(self.rng.randint(500, 1500), self.rng),
                "max_tokens": self.rng.randint(64, 192)}
        with self.client.post("/v1/completions", json=body, headers=self.headers(), catch_response=True,
                              name=self.kind) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            out = r.json()
            if not out.get("choices") or out["usage"]["completion_tokens"] < 1:
                r.failure("empty completion")
