"""An engine client's own estimate of the prefill work queued at its engine.

vLLM reports how many requests wait, not how many prompt tokens they still
have to prefill, yet the router's queue model needs tokens. The client that
sends the requests knows them: a request is pending from the moment it is sent
until its first token arrives. Its uncached part is estimated with a local LRU
of the engine-block hashes this engine has been sent (sized to the engine's KV
capacity), mirroring what vLLM's prefix cache probably holds.

One writer: the engine object that owns it, on its event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from serving.prefix.hashing import block_hashes


class PendingPrefill:
    def __init__(self, block_size: int, model: str, capacity_blocks: int = 0) -> None:
        self.block_size = block_size
        self.model = model
        self.capacity_blocks = capacity_blocks  # 0: unknown yet, keep nothing
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._pending: dict[str, int] = {}
        self.tokens = 0  # sum of pending requests' estimated uncached prompt tokens

    def resize(self, capacity_blocks: int) -> None:
        self.capacity_blocks = max(0, capacity_blocks)
        while len(self._lru) > self.capacity_blocks:
            self._lru.popitem(last=False)

    def add(self, request_id: str, prompt_ids: Sequence[int], cache_salt: str | None) -> int:
        """Count a sent request; returns its estimated uncached prompt tokens."""
        hashes = block_hashes(prompt_ids, self.block_size, self.model, cache_salt)
        hit = 0
        for h in hashes:  # chained hashes: the cached part is a prefix
            if h not in self._lru:
                break
            hit += 1
        for h in reversed(hashes):  # the prefix most recent: vLLM evicts a prompt's tail first
            self._lru[h] = None
            self._lru.move_to_end(h)
        self.resize(self.capacity_blocks)
        uncached = max(1, len(prompt_ids) - hit * self.block_size)
        self._pending[request_id] = uncached
        self.tokens += uncached
        return uncached

    def done(self, request_id: str) -> None:
        """First token seen, or the request ended: its prefill no longer queues."""
        self.tokens -= self._pending.pop(request_id, 0)

    def clear(self) -> None:
        """The engine's cache was reset (or the engine restarted)."""
        self._lru.clear()

    def __len__(self) -> int:
        return len(self._pending)
