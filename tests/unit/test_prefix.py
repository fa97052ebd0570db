"""Prefix hashing and the prefix index (serving/prefix), table-driven."""

from __future__ import annotations

import pytest

from serving.prefix import PrefixIndex, block_hashes
from serving.prefix.hashing import hashes_from_ids, root_seed

BS = 4
A = list(range(100, 116))  # 4 full blocks of 4
B = list(range(200, 216))


# --- hashing -------------------------------------------------------------------

@pytest.mark.parametrize("name, left, right, shared", [
    ("identical prompts share every block", (A, "m", None), (A, "m", None), 4),
    ("same first two blocks share two hashes", (A, "m", None), (A[:8] + B[:8], "m", None), 2),
    ("first token differs: nothing shared (chained)", (A, "m", None), ([0] + A[1:], "m", None), 0),
    ("a different model changes every hash", (A, "m", None), (A, "other", None), 0),
    ("a cache salt changes every hash", (A, "m", None), (A, "m", "tenant-a"), 0),
    ("two salts never match each other", (A, "m", "tenant-a"), (A, "m", "tenant-b"), 0),
    ("same salt shares", (A, "m", "tenant-a"), (A, "m", "tenant-a"), 4),
])
def test_hash_sharing(name, left, right, shared):
    h1 = block_hashes(left[0], BS, left[1], left[2])
    h2 = block_hashes(right[0], BS, right[1], right[2])
    common = 0
    for x, y in zip(h1, h2):
        if x != y:
            break
        common += 1
    assert common == shared, name
    # Chaining: once two prompts diverge, no later hash coincides either.
    assert not set(h1[shared:]) & set(h2[shared:]), name


@pytest.mark.parametrize("tokens, expected_blocks", [
    ([], 0), (A[:3], 0), (A[:4], 1), (A[:7], 1), (A, 4), (A + [1], 4),
])
def test_full_blocks_only(tokens, expected_blocks):
    assert len(block_hashes(tokens, BS, "m")) == expected_blocks


def test_partial_block_does_not_change_full_block_hashes():
    assert block_hashes(A + [1, 2], BS, "m") == block_hashes(A, BS, "m")


def test_block_size_changes_the_blocks():
    assert block_hashes(A, 8, "m") != block_hashes(A, 4, "m")[:2]
    assert len(block_hashes(A, 8, "m")) == 2


def test_characters_when_no_tokenizer():
    text = "You are a helpful assistant. " * 4
    h = block_hashes(text, 16, "m")
    assert len(h) == len(text) // 16
    assert block_hashes(text + "Question one?", 16, "m")[: len(h)] == h
    assert block_hashes("x" + text, 16, "m")[0] != h[0]


def test_hashes_are_small_ints_and_deterministic():
    h = block_hashes(A, BS, "m", "s")
    assert h == block_hashes(list(A), BS, "m", "s")  # list, tuple, array: same bytes
    assert all(isinstance(x, int) and 0 <= x < 2**60 for x in h)
    assert root_seed("m") != root_seed("m", "s")
    assert root_seed("ab", "c") != root_seed("a", "bc")  # no ambiguity between model and salt


def test_trace_ids_chain_like_tokens():
    h1 = hashes_from_ids([1, 2, 3], "m")
    assert hashes_from_ids([1, 2, 9], "m")[:2] == h1[:2]
    assert hashes_from_ids([0, 2, 3], "m")[1:] != h1[1:]  # position-dependent through the chain
    assert hashes_from_ids([1, 2, 3], "m", "salt") != h1


def test_block_size_must_be_positive():
    with pytest.raises(ValueError):
        block_hashes(A, 0, "m")
    with pytest.raises(ValueError):
        PrefixIndex(0)


# --- index ------------------------------------------------------------------------

def _index(capacity_blocks: int = 8, replicas=("r0", "r1", "r2")) -> PrefixIndex:
    idx = PrefixIndex(BS)
    for r in replicas:
        idx.add_replica(r, capacity_blocks * BS)
    return idx


def test_match_longest_prefix_per_replica():
    idx = _index()
    h = block_hashes(A, BS, "m")
    idx.insert("r0", h)  # all 4
    idx.insert("r1", h[:2])
    idx.insert("r2", h[1:])  # no first block: not a prefix
    assert idx.match(h) == {"r0": 4, "r1": 2}
    assert idx.match(h[:1]) == {"r0": 1, "r1": 1}
    assert idx.match(block_hashes(B, BS, "m")) == {}
    assert idx.match(()) == {}


@pytest.mark.parametrize("name, ops, expect_lru", [
    ("a prompt's tail is least recent", [("a", "b", "c")], ["c", "b", "a"]),
    ("later prompts are more recent", [("a", "b"), ("c",)], ["b", "a", "c"]),
    ("re-inserting moves to the recent end", [("a", "b", "c"), ("b",)], ["c", "a", "b"]),
    ("a batch keeps its own order", [("a", "b"), ("c", "a", "b")], ["b", "a", "c"]),
])
def test_lru_order(name, ops, expect_lru):
    idx = _index()
    ids = {k: i + 1 for i, k in enumerate("abcdef")}
    for op in ops:
        idx.insert("r0", [ids[k] for k in op])
    assert idx.blocks("r0") == [ids[k] for k in expect_lru], name


@pytest.mark.parametrize("capacity, inserted, kept", [
    (3, [1, 2, 3, 4, 5], [3, 4, 5]),
    (5, [1, 2, 3], [1, 2, 3]),
    (2, [1, 2, 1, 3], [1, 3]),  # 1 was refreshed, so 2 went
])
def test_capacity_bound_evicts_least_recent(capacity, inserted, kept):
    idx = _index(capacity)
    for h in inserted:
        idx.insert("r0", [h])
    assert idx.blocks("r0") == kept
    assert len(idx) == len(kept)
    assert idx.match([kept[0]]) == {"r0": 1}
    evicted = set(inserted) - set(kept)
    assert all(idx.match([h]) == {} for h in evicted)


def test_capacity_shrink_and_zero_capacity():
    idx = _index(4)
    idx.insert("r0", [1, 2, 3, 4])
    idx.set_capacity("r0", 2 * BS)
    assert idx.blocks("r0") == [2, 1]  # the prompt's prefix stays
    idx.add_replica("z", 0)
    assert idx.insert("z", [1]) == []
    assert idx.match([1]) == {"r0": 1}  # z holds nothing


def test_eviction_on_one_replica_keeps_other_holders():
    idx = _index(2)
    idx.insert("r0", [1, 2])
    idx.insert("r1", [1, 2])
    idx.insert("r0", [3, 4])  # r0 drops 1, 2
    assert idx.match([1, 2]) == {"r1": 2}


@pytest.mark.parametrize("succeeded, still_held", [(True, True), (False, False)])
def test_booking_release(succeeded, still_held):
    idx = _index()
    h = block_hashes(A, BS, "m")
    idx.insert("r0", h[:1])  # known before the request
    idx.book("req-1", "r0", h)
    assert idx.booked == 1
    assert idx.match(h) == {"r0": 4}  # a burst sees the booked blocks at once
    idx.release("req-1", succeeded=succeeded)
    assert idx.booked == 0
    expected = {"r0": 4} if still_held else {"r0": 1}  # a failure takes back only its guesses
    assert idx.match(h) == expected
    idx.release("req-1", succeeded=False)  # idempotent
    assert idx.match(h) == expected


def test_replica_removal_forgets_blocks_and_bookings_and_reuses_slot():
    idx = _index()
    h = block_hashes(A, BS, "m")
    idx.insert("r0", h)
    idx.insert("r1", h)
    idx.book("req", "r1", block_hashes(B, BS, "m"))
    idx.remove_replica("r1")
    assert "r1" not in idx
    assert idx.match(h) == {"r0": 4}
    assert idx.match(block_hashes(B, BS, "m")) == {}
    assert idx.booked == 0
    idx.add_replica("r3", 8 * BS)  # takes r1's free slot; must not inherit its blocks
    assert idx.match(h) == {"r0": 4}
    idx.remove_replica("nope")  # unknown: no error


def test_reset_replica_keeps_membership_and_capacity():
    idx = _index(3)
    idx.insert("r0", [1, 2, 3])
    idx.reset_replica("r0")
    assert "r0" in idx and idx.blocks("r0") == []
    idx.insert("r0", [4, 5, 6, 7])
    assert idx.blocks("r0") == [6, 5, 4]


def test_memory_per_entry_is_bounded():
    """The issue's bound: at most 150 bytes per (block, replica) entry, measured."""
    from serving.bench.routing import bytes_per_entry

    assert bytes_per_entry(replicas=16, blocks=30_000) <= 150


def test_lru_matches_a_reference_lru_under_random_churn():
    """The two-generation LRU evicts exactly what an OrderedDict LRU would."""
    import random
    from collections import OrderedDict

    rng = random.Random(3)
    idx = _index(capacity_blocks=50, replicas=("r0",))
    ref: OrderedDict[int, None] = OrderedDict()
    for step in range(5000):
        batch = [rng.randrange(1, 120) for _ in range(rng.randrange(1, 6))]
        batch = list(dict.fromkeys(batch))
        if step % 97 == 0:
            idx.book(f"q{step}", "r0", batch)
            added = [h for h in batch if h not in ref]
            for h in reversed(batch):  # a prompt's first block is the most recent
                ref.pop(h, None)
                ref[h] = None
            while len(ref) > 50:
                ref.popitem(last=False)
            idx.release(f"q{step}", succeeded=False)
            for h in added:
                ref.pop(h, None)
        else:
            idx.insert("r0", batch)
            for h in reversed(batch):
                ref.pop(h, None)
                ref[h] = None
            while len(ref) > 50:
                ref.popitem(last=False)
        assert idx.blocks("r0") == list(ref)


def test_eviction_takes_a_prompts_tail_before_its_prefix():
    """As vLLM frees a request's blocks tail first: under pressure the prefix still matches."""
    idx = _index(capacity_blocks=4)
    h = block_hashes(A, BS, "m")  # 4 blocks
    idx.insert("r0", h)
    idx.insert("r0", block_hashes(B, BS, "m")[:2])  # 2 more: 2 must go
    assert idx.match(h) == {"r0": 2}
    assert set(idx.blocks("r0")) >= set(h[:2])


def test_match_equals_a_block_by_block_scan_under_churn():
    """The galloping match finds, per replica, exactly the longest run of held leading blocks."""
    import random

    rng = random.Random(5)
    replicas = [f"r{i}" for i in range(12)]
    idx = _index(capacity_blocks=60, replicas=replicas)
    roots = [[rng.randrange(32000) for _ in range(BS * rng.randrange(1, 12))] for _ in range(6)]

    def prompt() -> list[int]:
        toks = list(rng.choice(roots))
        return toks + [rng.randrange(32000) for _ in range(BS * rng.randrange(0, 20))]

    live: list[str] = []
    for step in range(3000):
        hashes = block_hashes(prompt(), BS, "m")
        rid = rng.choice(replicas)
        if step % 3:
            idx.insert(rid, hashes)
        else:
            idx.book(f"q{step}", rid, hashes)
            live.append(f"q{step}")
            if len(live) > 8:
                idx.release(live.pop(0), succeeded=True)
        probe = block_hashes(prompt(), BS, "m")
        expected = {}
        for r in replicas:
            held = set(idx.blocks(r))
            n = 0
            while n < len(probe) and probe[n] in held:
                n += 1
            if n:
                expected[r] = n
        assert idx.match(probe) == expected, step
