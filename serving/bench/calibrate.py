"""Fit an engine profile's step model to a running vLLM server.

    python -m serving.bench.calibrate --engine-url URL --model-dir DIR [--repeats 3]

    step_ms = a + b * uncached_prefill_tokens + c * decode_seqs

Measured at the client, on an otherwise idle server, with unique prompts
(salted so the prefix cache never hits):

- b and a prefill step's fixed cost: TTFT of cold prompts of 256..3072
  tokens with max_tokens=1, fitted by least squares (TTFT = t0 + b * L);
- a + c: the inter-token time of one sequence decoding alone;
- a + c * n: the inter-token time with n sequences decoding together; c is the
  slope over n, a the intercept.

Prints one JSON object with a_ms, b_ms_per_token, c_ms_per_seq and the raw points.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid
from pathlib import Path

import numpy as np

from serving.engines.base import GenerateRequest
from serving.engines.vllm_http import VLLMHttpEngine


async def _timed(e: VLLMHttpEngine, ids: list[int], max_tokens: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = None
    n = 0
    salt = uuid.uuid4().hex  # never a cache hit
    async for ch in e.generate(GenerateRequest(uuid.uuid4().hex, tuple(ids), max_tokens=max_tokens,
                                               cache_salt=salt, temperature=0.0, ignore_eos=True)):
        if first is None and ch.token_ids:
            first = time.perf_counter()
        n = ch.completion_tokens
    end = time.perf_counter()
    return ((first or end) - t0) * 1000, (end - t0) * 1000, n


async def calibrate(url: str, word_ids: list[int], repeats: int, model: str) -> dict:
    rng = random.Random(0)
    e = VLLMHttpEngine("cal", url, model=model)
    prompt = lambda n: [rng.choice(word_ids) for _ in range(n)]  # noqa: E731
    try:
        await _timed(e, prompt(256), 4)  # warm-up
        lengths, ttfts = [], []
        for L in (256, 512, 1024, 1536, 2048, 3072):
            for _ in range(repeats):
                lengths.append(L)
                ttfts.append((await _timed(e, prompt(L), 1))[0])
        b, t0 = np.polyfit(lengths, ttfts, 1)
        decode = 64
        itl = {}
        for n in (1, 4, 8, 16):
            runs = await asyncio.gather(*(_timed(e, prompt(32), decode + 1) for _ in range(n)))
            itl[n] = float(np.median([(e2e - ttft) / decode for ttft, e2e, _ in runs]))
        c, a = np.polyfit(list(itl), list(itl.values()), 1)
    finally:
        await e.close()
    return {"a_ms": round(float(a), 3), "b_ms_per_token": round(float(b), 5), "c_ms_per_seq": round(float(c), 4),
            "prefill_fixed_ms": round(float(t0), 2),
            "prefill_points": [[L, round(t, 1)] for L, t in zip(lengths, ttfts)],
            "itl_ms_by_batch": {str(k): round(v, 3) for k, v in itl.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine-url", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--served-model", default="tiny")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    ids = json.loads((Path(a.model_dir) / "proxima_words.json").read_text())["ids"]
    print(json.dumps(asyncio.run(calibrate(a.engine_url, ids, a.repeats, a.served_model))))


if __name__ == "__main__":
    main()
