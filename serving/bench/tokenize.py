"""The gateway's own tokenization on real engines' path: agent loops, and the event loop.

    python -m serving.bench.tokenize [--system-tokens 4000] [--step-tokens 800] [--steps 30]

With `models[].tokenizer` set, the gateway renders chat with the model's
template and tokenizes it before routing; that is the largest cost it adds
before the first token. Uses the tiny model's byte-level BPE tokenizer, made
offline (serving.models.tiny), which tokenizes like Llama 3's and Qwen's.

- agent_loop: sessions whose context grows by a tool result and an answer
  (`--step-tokens`) per call on a shared system prompt, as coding agents'
  loops do; each call's render + tokenize is timed twice side by side, whole
  text (the tokenizer as vLLM's server calls it) and piece by piece through
  HFTokenizer's cache (the gateway). The ids are checked equal on every call.
- event_loop: one 30,000-token prompt bound while a 1 ms ticker runs on the
  same event loop (as other streams' chunks would be): the worst gap the
  ticker sees with bind on the loop, and on the gateway's tokenizer thread.

Prints one JSON object with the medians and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from serving.ingress.hf_tokenizer import HFTokenizer
from serving.models.tiny import WORDS, write_tokenizer

_BITS = (".", ",", "\n", " 42", " (x)", ":", "\n\n")


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_BITS) if rng.random() < 0.1 else " " + rng.choice(WORDS) for _ in range(n))


def agent_loop(hf: HFTokenizer, rng: random.Random, system_tokens: int, step_tokens: int,
               steps: int, sessions: int) -> dict:
    system = {"role": "system", "content": _text(rng, system_tokens)}
    whole, piecewise, lengths = [], [], []
    convs = [[system, {"role": "user", "content": _text(rng, 200)}] for _ in range(sessions)]
    for _ in range(steps):
        for msgs in convs:  # sessions interleave, as concurrent agents' calls do
            t = time.perf_counter()
            text = hf.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            want = hf.tok(text, add_special_tokens=False).input_ids
            whole.append(time.perf_counter() - t)
            t = time.perf_counter()
            got = hf.chat(tuple(msgs))
            piecewise.append(time.perf_counter() - t)
            if got != want:
                raise AssertionError("piecewise ids differ from the whole text's")
            lengths.append(len(want))
            msgs += [{"role": "assistant", "content": _text(rng, step_tokens // 4)},
                     {"role": "tool", "content": _text(rng, step_tokens - step_tokens // 4)}]
    w, p = statistics.median(whole) * 1e3, statistics.median(piecewise) * 1e3
    return {"calls": len(whole), "prompt_tokens_p50": int(statistics.median(lengths)),
            "prompt_tokens_max": max(lengths), "whole_ms_p50": round(w, 3), "piecewise_ms_p50": round(p, 3),
            "speedup_p50": round(w / p, 2), "whole_ms_max": round(max(whole) * 1e3, 2),
            "piecewise_ms_max": round(max(piecewise) * 1e3, 2), "cache_tokens": hf.cached_tokens}


async def event_loop(hf_path: str, rng: random.Random, tokens: int, rounds: int) -> dict:
    msgs = ({"role": "system", "content": _text(rng, tokens)}, {"role": "user", "content": "go"})
    pool = ThreadPoolExecutor(1)
    out = {}
    for mode in ("on_loop", "on_thread"):
        gaps = []
        for _ in range(rounds):
            hf = HFTokenizer(hf_path, cache_tokens=0)  # cold: nothing cached, the whole prompt is work
            stop = asyncio.Event()

            async def tick() -> float:
                worst, t = 0.0, time.perf_counter()
                while not stop.is_set():
                    await asyncio.sleep(0.001)
                    now = time.perf_counter()
                    worst, t = max(worst, now - t), now
                return worst

            task = asyncio.create_task(tick())
            await asyncio.sleep(0.01)
            if mode == "on_loop":
                hf.chat(msgs)
            else:
                await asyncio.get_running_loop().run_in_executor(pool, hf.chat, msgs)
            await asyncio.sleep(0.005)
            stop.set()
            gaps.append(await task)
        out[f"worst_gap_ms_{mode}_p50"] = round(statistics.median(gaps) * 1e3, 2)
    pool.shutdown()
    out["prompt_tokens"] = tokens
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system-tokens", type=int, default=4000)
    ap.add_argument("--step-tokens", type=int, default=800)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--long-tokens", type=int, default=30000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(d)
        hf = HFTokenizer(d)
        result = {"agent_loop": agent_loop(hf, rng, args.system_tokens, args.step_tokens, args.steps,
                                           args.sessions),
                  "event_loop": asyncio.run(event_loop(d, rng, args.long_tokens, args.rounds))}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
