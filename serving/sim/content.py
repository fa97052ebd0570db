"""Prompt segments -> the engine's chained block hashes, with a chain cache.

A block's identity is (its index j, the key of the segment holding its last
token), chained from its parent block's hash exactly as vLLM chains block
hashes (serving.prefix.hashing), seeded with the model and the cache salt
(the tenant): two prompts share block j exactly when they share everything
up to its end, and tenants never share. A 512-token trace block thus maps
onto 32 engine blocks of 16 tokens, each chained from the one before.

Chaining costs one xxh3 per block, so chains of shared segments are cached
by (parent hash, segment key): a session's next step hashes only its new
blocks. Blocks inside unshared content are unique by construction and take a
counter instead of a hash (nothing can ever match them).
"""

from __future__ import annotations

from collections import OrderedDict

import xxhash

from serving.prefix.hashing import root_seed

_MASK = (1 << 60) - 1
_M64 = (1 << 64) - 1
_GOLD = 0x9E3779B97F4A7C15
_xxh = xxhash.xxh3_64_intdigest


class Hasher:
    def __init__(self, block_size: int, cache_entries: int = 20_000):
        self.bs = block_size
        self.cache: OrderedDict[tuple[int, int], list[int]] = OrderedDict()
        self.cache_entries = cache_entries
        self._roots: dict[tuple[str, str], int] = {}

    def root(self, model: str, salt: str) -> int:
        r = self._roots.get((model, salt))
        if r is None:
            r = self._roots[(model, salt)] = root_seed(model, salt or None)
        return r

    def hashes(self, segments, prompt_len: int, model: str, salt: str) -> tuple[int, ...]:
        bs = self.bs
        n = prompt_len // bs
        out: list[int] = []
        parent = self.root(model, salt)
        pos = 0
        for key, ntok, shared in segments:
            end = pos + ntok
            hi = min(n, end // bs)  # blocks j < hi have their last token before `end`
            lo = len(out)
            pos = end
            if hi <= lo:
                continue
            if not shared:
                # Unique content: every block from here on is unique (chained), so any
                # distinct numbers will do; derive them from the parent to stay deterministic.
                base = (_xxh(key.to_bytes(8, "little"), parent) << 20) & _MASK
                out.extend(range(base + lo, base + n))
                return tuple(out)
            ck = (parent, key)
            chain = self.cache.get(ck)
            if chain is None:
                chain = []
                if len(self.cache) >= self.cache_entries:
                    self.cache.popitem(last=False)  # oldest first
                self.cache[ck] = chain
            need = hi - lo
            if len(chain) < need:
                h = chain[-1] if chain else parent
                for j in range(lo + len(chain), hi):
                    h = _xxh(((key ^ (j * _GOLD)) & _M64).to_bytes(8, "little"), h) & _MASK
                    chain.append(h)
            out.extend(chain[:need])
            parent = out[-1]
        return tuple(out)
