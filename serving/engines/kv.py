"""Paged KV blocks with a prefix cache and LRU eviction, as vLLM's block pool.

Accounting only (no tensors): a block is either anonymous (a partial prompt
block or decode tokens) or holds a full prompt block named by its chained
hash. Hashed blocks are shared by reference count; when the count drops to
zero the block stays cached but becomes evictable, least recently freed
first. Allocation takes never-used or anonymous free blocks before evicting
cached ones (vLLM's free queue evicts in freeing order; this is the same
LRU among cached blocks).
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import takewhile


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_anon = num_blocks
        self.refs: dict[int, int] = {}  # hash -> holders (0 = cached, evictable)
        # refcount-0 hashes, least recent first. An OrderedDict, not a dict: popping a
        # dict's first key scans the deleted slots before it, O(evictions) each time.
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return self.free_anon + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def cached_prefix(self, hashes) -> int:
        """How many leading blocks of `hashes` are cached (in use or evictable)."""
        # takewhile with a C predicate: no Python frame per block (long prompts)
        return len(list(takewhile(self.refs.__contains__, hashes)))

    def can_allocate(self, n_new: int, hashes_to_ref=()) -> bool:
        # Referencing an evictable block takes it off the free list.
        # refcount 0 <=> evictable; counted at C speed
        taken = sum(map(self.evictable.__contains__, hashes_to_ref))
        return self.num_free - taken >= n_new

    def ref(self, hashes) -> None:
        refs, ev = self.refs, self.evictable
        for h in hashes:
            c = refs[h]
            if c == 0:
                del ev[h]
            refs[h] = c + 1

    def allocate(self, n: int) -> None:
        """Take n anonymous blocks, evicting cached ones if needed (caller checked)."""
        take = min(n, self.free_anon)
        self.free_anon -= take
        n -= take
        ev, refs = self.evictable, self.refs
        while n > 0:
            h = ev.popitem(last=False)[0]
            del refs[h]
            self.evictions += 1
            n -= 1

    def promote(self, h: int) -> None:
        """An anonymous block just filled with a full prompt block named h."""
        c = self.refs.get(h)
        if c is None:
            self.refs[h] = 1
            return
        # Someone computed the same block meanwhile: share theirs, free ours.
        if c == 0:
            del self.evictable[h]
        self.refs[h] = c + 1
        self.free_anon += 1

    def promote_many(self, hashes) -> None:
        """`promote` for consecutive blocks of one prompt, in order."""
        refs = self.refs
        if refs.keys().isdisjoint(hashes):  # the usual case: all new, one C-level update
            refs.update(dict.fromkeys(hashes, 1))
            return
        for h in hashes:
            self.promote(h)

    def free(self, hashes, n_anon: int) -> None:
        """Release a request's blocks, its last blocks first (they evict first)."""
        refs, ev = self.refs, self.evictable
        for h in reversed(hashes):
            c = refs[h] - 1
            refs[h] = c
            if c == 0:
                ev[h] = None
        self.free_anon += n_anon

    def reset(self) -> None:
        """Drop every cached block that no request holds (vLLM's reset_prefix_cache)."""
        for h in list(self.evictable):
            del self.refs[h]
            self.free_anon += 1
        self.evictable.clear()
