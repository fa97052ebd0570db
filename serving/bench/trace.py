"""Mooncake JSONL traces, turned into real prompts for real engines.

A record is `{"timestamp": ms, "input_length": n, "output_length": m,
"hash_ids": [...]}` plus optional `region`, `session_id`, `tenant`. Each hash
id names 512 tokens of content; the prompt is the concatenation of its
blocks' tokens cut to `input_length`. The same hash id always becomes the same
token ids (drawn with the id as the seed from a vocabulary of one-token words),
so two records that share hash-id prefixes share exactly those prompt tokens,
and vLLM's prefix cache sees what the trace says it should.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

TRACE_BLOCK = 512


@dataclass(frozen=True, slots=True)
class TraceRecord:
    index: int
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    region: str = ""
    session_id: str | None = None
    tenant: str = ""


def load(path: str | Path, limit: int | None = None) -> list[TraceRecord]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                out.append(TraceRecord(len(out), float(r["timestamp"]), int(r["input_length"]),
                                       max(1, int(r["output_length"])), tuple(int(h) for h in r["hash_ids"]),
                                       str(r.get("region") or ""), r.get("session_id"),
                                       str(r.get("tenant") or "")))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: not a Mooncake trace record ({e})") from None
            if limit is not None and len(out) >= limit:
                break
    out.sort(key=lambda r: (r.timestamp_ms, r.index))
    return out


class PromptMaker:
    """Token ids (and the equivalent text) for trace records."""

    def __init__(self, word_ids: Sequence[int], words: Sequence[str] | None = None,
                 block_tokens: int = TRACE_BLOCK):
        self.word_ids = list(word_ids)
        self.words = list(words) if words is not None else None
        self.block_tokens = block_tokens
        self._blocks: dict[int, list[int]] = {}
        self._word_of = dict(zip(self.word_ids, self.words)) if self.words else {}

    def block(self, hash_id: int) -> list[int]:
        b = self._blocks.get(hash_id)
        if b is None:
            rng = random.Random(hash_id * 1_000_003 + 17)
            b = [rng.choice(self.word_ids) for _ in range(self.block_tokens)]
            self._blocks[hash_id] = b
        return b

    def token_ids(self, rec: TraceRecord) -> list[int]:
        ids: list[int] = []
        for h in rec.hash_ids:
            ids.extend(self.block(h))
            if len(ids) >= rec.input_length:
                break
        if len(ids) < rec.input_length:  # a trace whose hash ids cover too little: pad uniquely
            rng = random.Random(rec.index)
            ids.extend(rng.choice(self.word_ids) for _ in range(rec.input_length - len(ids)))
        return ids[:rec.input_length]

    def text(self, ids: Sequence[int]) -> str:
        """The text that tokenizes back to exactly `ids` (one word = one token)."""
        if not self._word_of:
            raise ValueError("PromptMaker needs the words to make text")
        return "".join(" " + self._word_of[i] for i in ids)
