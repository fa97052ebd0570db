"""Which replicas probably hold which prefix blocks.

One owner (the router) mutates it. Layout, chosen for memory and speed:

- each replica gets a small integer slot; `_holders[h]` is a bitmask of the
  slots that probably hold block h (one dict entry per block, not per pair);
- each replica has an exact LRU of its blocks, bounded by the replica's KV
  capacity in blocks, as vLLM evicts least recently used free blocks first
  (see `_Lru`: two plain dicts, about half an OrderedDict's memory). Like
  vLLM, which frees a finished request's blocks tail first, a prompt's
  blocks are recorded with its first block the most recent: a parent is
  always more recent than its children, so eviction takes a prompt's tail
  before its prefix and each replica's blocks stay prefix-closed (a replica
  that holds block i holds blocks 0..i-1);
- a "booking" records the blocks a routed-but-unfinished request added, so a
  burst sees them at once, and a failed request's guesses are taken back.

Matching needs the holder mask along the prompt's chained hashes. Because
each replica's blocks are prefix-closed, the mask only loses bits along the
chain; it is constant over runs, and each run's end is found by galloping
search, so a match costs O(runs * log(blocks)) lookups rather than one per
block (a 4k-token prompt held by 3 replicas: about 25 lookups, not 256).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import compress, filterfalse, islice, repeat
from operator import and_, length_hint, not_
from typing import Iterable, Sequence


class _Lru:
    """An exact LRU set of block hashes in two generations of plain dicts.

    `young` takes every insert and refresh, in recency order. `old` holds the
    previous generation, older than all of `young`, and is only ever deleted
    from; `order` lists its keys in recency order and `rest`, an iterator over
    `order`, is the cursor, so popping the oldest key is O(1) amortised (a
    plain dict's first key is not: the scan skips every slot deleted before
    it; nor is re-slicing `order` from an integer cursor, which walks from its
    start). When `old` runs dry, `young` becomes `old`. Per key: a dict slot,
    plus 8 bytes in `order` while old; an OrderedDict costs twice that (its
    linked-list node), and memory per indexed entry is what bounds the
    router's index.
    """

    __slots__ = ("young", "old", "order", "rest")

    def __init__(self) -> None:
        self.young: dict[int, None] = {}
        self.old: dict[int, None] = {}
        self.order: list[int] = []
        self.rest = iter(self.order)  # the keys of `order` not yet passed

    def __len__(self) -> int:
        return len(self.young) + len(self.old)

    def __contains__(self, h: int) -> bool:
        return h in self.young or h in self.old

    def __iter__(self):
        """Oldest first."""
        old, order = self.old, self.order
        yield from (h for h in order[len(order) - length_hint(self.rest):] if h in old)
        yield from self.young

    def touch(self, hashes: list[int]) -> list[int]:
        """Insert or refresh `hashes` (most recent last); returns the new ones."""
        young, old = self.young, self.old
        # (filters and maps at C level: no Python frame per block)
        added = list(filterfalse(young.__contains__, hashes))
        if old and added:
            added = list(filterfalse(old.__contains__, added))
        if len(added) < len(hashes):  # move the known ones to the recent end, in order
            deque(map(young.pop, hashes, repeat(None)), maxlen=0)
            if old:
                deque(map(old.pop, hashes, repeat(None)), maxlen=0)
        young.update(dict.fromkeys(hashes))
        return added

    def discard(self, h: int) -> bool:
        return self.young.pop(h, 0) is None or self.old.pop(h, 0) is None

    def _next_generation(self) -> bool:
        """`old` is empty (`rest` ran out): `young` takes its place; False if it is empty too."""
        if not self.young:
            return False
        self.old, self.young = self.young, {}
        self.order = list(self.old)
        self.rest = iter(self.order)
        return True

    def pop_oldest(self) -> int:
        while True:
            old = self.old
            for h in self.rest:
                if old.pop(h, 0) is None:  # else it moved to `young` or was discarded
                    return h
            if not self._next_generation():
                raise KeyError("pop from an empty LRU")

    def pop_oldest_many(self, n: int) -> list[int]:
        """The n oldest keys, removed, oldest first (fewer if the LRU holds fewer)."""
        out: list[int] = []
        while len(out) < n:
            want, old = n - len(out), self.old
            # the next keys of `order` still in `old` (others moved to `young` or were
            # discarded), found and popped at C level; `rest` stops right after the last
            got = list(islice(filter(old.__contains__, self.rest), want))
            deque(map(old.pop, got), maxlen=0)
            out += got
            if len(got) < want and not self._next_generation():
                break
        return out


@dataclass(slots=True)
class _Replica:
    slot: int
    capacity_blocks: int
    lru: _Lru


class PrefixIndex:
    def __init__(self, block_size: int):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self._holders: dict[int, int] = {}
        self._replicas: dict[str, _Replica] = {}
        self._slot_owner: dict[int, str] = {}
        self._bookings: dict[str, tuple[str, list[int]]] = {}
        self.evictions = 0

    # --- membership -------------------------------------------------------
    def add_replica(self, replica_id: str, capacity_tokens: int) -> None:
        if replica_id in self._replicas:
            self.set_capacity(replica_id, capacity_tokens)
            return
        slot = next(i for i in range(len(self._slot_owner) + 1) if i not in self._slot_owner)
        self._replicas[replica_id] = _Replica(slot, max(0, capacity_tokens // self.block_size), _Lru())
        self._slot_owner[slot] = replica_id

    def set_capacity(self, replica_id: str, capacity_tokens: int) -> None:
        rep = self._replicas[replica_id]
        rep.capacity_blocks = max(0, capacity_tokens // self.block_size)
        self._evict_to(rep, rep.capacity_blocks)

    def remove_replica(self, replica_id: str) -> None:
        rep = self._replicas.pop(replica_id, None)
        if rep is None:
            return
        bit = 1 << rep.slot
        holders = self._holders
        for h in rep.lru:
            mask = holders[h] & ~bit
            if mask:
                holders[h] = mask
            else:
                del holders[h]
        del self._slot_owner[rep.slot]
        for rid in [r for r, (rep_id, _) in self._bookings.items() if rep_id == replica_id]:
            del self._bookings[rid]

    def reset_replica(self, replica_id: str) -> None:
        """Forget a replica's blocks (its engine restarted or reset its cache)."""
        rep = self._replicas.get(replica_id)
        if rep is not None:
            cap = rep.capacity_blocks * self.block_size
            self.remove_replica(replica_id)
            self.add_replica(replica_id, cap)

    def __contains__(self, replica_id: str) -> bool:
        return replica_id in self._replicas

    @property
    def replicas(self) -> list[str]:
        return list(self._replicas)

    # --- queries ----------------------------------------------------------
    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Longest cached prefix, in blocks, per replica that holds at least one."""
        owner = self._slot_owner
        found: dict[str, int] = {}
        for mask, blocks in self.match_groups(hashes):
            while mask:
                low = mask & -mask
                mask ^= low
                found[owner[low.bit_length() - 1]] = blocks
        return found

    def match_groups(self, hashes: Sequence[int]) -> list[tuple[int, int]]:
        """`match` as (slot bitmask, blocks) groups: the slots of a mask hold exactly
        that many leading blocks."""
        n = len(hashes)
        get = self._holders.get
        cur = get(hashes[0], 0) if n else 0  # slots holding every block so far
        if not cur:
            return []
        out: list[tuple[int, int]] = []
        lo = 0  # the mask at block lo is cur
        while True:
            # Gallop, then bisect, for the last block whose mask is still cur: the
            # mask only shrinks along the chain (prefix-closed replicas).
            step, hi = 1, lo + 1
            while hi < n and get(hashes[hi], 0) == cur:
                lo, step = hi, step * 2
                hi = lo + step
            hi = min(hi, n)  # the mask at hi differs from cur (or hi == n)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if get(hashes[mid], 0) == cur:
                    lo = mid
                else:
                    hi = mid
            if hi == n:
                out.append((cur, n))
                return out
            nxt = get(hashes[hi], 0) & cur
            out.append((cur & ~nxt, hi))  # the slots that dropped out hold exactly hi blocks
            if not nxt:
                return out
            cur, lo = nxt, hi

    def blocks(self, replica_id: str) -> list[int]:
        """A replica's blocks, least recently used first."""
        return list(self._replicas[replica_id].lru)

    def __len__(self) -> int:
        """Indexed (block, replica) pairs."""
        return sum(len(r.lru) for r in self._replicas.values())

    # --- updates ----------------------------------------------------------
    def insert(self, replica_id: str, hashes: Iterable[int]) -> list[int]:
        """Mark a prompt's blocks (in prompt order) as held, its first block the most
        recent, as vLLM leaves them when the request ends. Returns the newly added ones."""
        rep = self._replicas.get(replica_id)
        if rep is None or rep.capacity_blocks == 0:
            return []
        holders, bit = self._holders, 1 << rep.slot
        hashes = list(hashes)
        hashes.reverse()
        added = rep.lru.touch(hashes)
        if added:  # holders[h] |= bit for each, at C level
            holders.update(zip(added, map(int.__or__, map(holders.get, added, repeat(0)), repeat(bit))))
        if len(rep.lru) > rep.capacity_blocks:
            self._evict_to(rep, rep.capacity_blocks)
        return added

    def book(self, request_id: str, replica_id: str, hashes: Sequence[int]) -> None:
        """A request was routed here: count its blocks as held from now on."""
        self._bookings[request_id] = (replica_id, self.insert(replica_id, hashes))

    def release(self, request_id: str, *, succeeded: bool = True) -> None:
        """A booked request ended. On failure, take back the blocks it guessed."""
        booking = self._bookings.pop(request_id, None)
        if booking is None or succeeded:
            return
        replica_id, added = booking
        rep = self._replicas.get(replica_id)
        if rep is None:
            return
        bit = 1 << rep.slot
        for h in added:
            if rep.lru.discard(h):
                self._drop_bit(h, bit)

    @property
    def booked(self) -> int:
        return len(self._bookings)

    # --- internals --------------------------------------------------------
    def _evict_to(self, rep: _Replica, limit: int) -> None:
        lru = rep.lru
        if len(lru) <= limit:
            return
        gone = lru.pop_oldest_many(len(lru) - limit)
        self.evictions += len(gone)
        # clear this slot's bit in each evicted block's mask; delete masks left empty
        holders = self._holders
        masks = list(map(and_, map(holders.__getitem__, gone), repeat(~(1 << rep.slot))))
        holders.update(zip(gone, masks))
        deque(map(holders.__delitem__, compress(gone, map(not_, masks))), maxlen=0)

    def _drop_bit(self, h: int, bit: int) -> None:
        mask = self._holders[h] & ~bit
        if mask:
            self._holders[h] = mask
        else:
            del self._holders[h]
