"""A deterministic word tokenizer for simulated engines and text-only routing.

One whitespace-separated word is one token (its id a hash of the word), so a
prompt's token count and prefix blocks are stable across processes without a
model's vocabulary. Real engines use their model's tokenizer instead.
"""

from __future__ import annotations

import xxhash

VOCAB_SIZE = 32000

# Sim engines "generate" these words; token id i maps to WORDS[i % len(WORDS)].
WORDS = ("the", "router", "sends", "each", "call", "where", "its", "first", "token", "arrives",
         "soonest", "cache", "prefix", "region", "replica", "queue", "latency", "agent", "tool",
         "result", "model", "stream", "budget", "tenant", "engine", "block", "hash", "prompt",
         "reply", "fast", "near", "warm")


def encode(text: str) -> list[int]:
    h = xxhash.xxh32_intdigest
    return [h(w.encode()) % VOCAB_SIZE for w in text.split()]


def count(text: str) -> int:
    return len(text.split())


def decode_token(token_id: int) -> str:
    return WORDS[token_id % len(WORDS)]


def piece(token_id: int) -> str:
    """A simulated engine's text for a token id it generates (a word and the space before it)."""
    return " " + WORDS[token_id % len(WORDS)]
