"""Chained prefix-block hashes, as vLLM hashes its KV blocks.

    h_0 = H(block_0, seed=H(model, cache_salt))
    h_i = H(block_i, seed=h_{i-1})

Only full blocks are hashed (a partial last block is never cached by vLLM
either). A block is `block_size` token ids, or `block_size` characters when no
tokenizer is configured. Because each hash is seeded with its parent, two
prompts share hash i exactly when they share the first i+1 blocks, and a
different model or cache salt changes every hash: tenants with different
salts can never match each other's prefixes.

H is xxh3-64 truncated to 60 bits, so a hash is a small Python int (32 bytes)
that the prefix index can share between its maps.
"""

from __future__ import annotations

from array import array
from typing import NewType, Sequence

import xxhash

BlockHash = NewType("BlockHash", int)

_MASK = (1 << 60) - 1
_UNIT = 4  # bytes per token id or per character (utf-32)
_xxh = xxhash.xxh3_64_intdigest


def root_seed(model: str, cache_salt: str | None = None) -> int:
    """The seed of a prompt's first block: it binds hashes to model and salt."""
    salt = cache_salt or ""
    return _xxh(f"{len(model)}:{model}|{salt}".encode()) & _MASK


def _as_bytes(prompt: Sequence[int] | str) -> bytes:
    if isinstance(prompt, str):
        return prompt.encode("utf-32-le")
    if isinstance(prompt, array) and prompt.typecode == "I":
        return prompt.tobytes()
    return array("I", prompt).tobytes()


def block_hashes(prompt: Sequence[int] | str, block_size: int, model: str,
                 cache_salt: str | None = None) -> tuple[BlockHash, ...]:
    """Hashes of every full block of `prompt` (token ids, or text as characters)."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    data = _as_bytes(prompt)
    step = block_size * _UNIT
    n_full = len(data) // step
    seed = root_seed(model, cache_salt)
    out = []
    append = out.append
    for start in range(0, n_full * step, step):  # (a 64-byte bytes slice is cheaper than a memoryview's)
        seed = _xxh(data[start:start + step], seed) & _MASK
        append(seed)
    return tuple(out)  # type: ignore[return-value]


def hashes_from_ids(ids: Sequence[int], model: str, cache_salt: str | None = None) -> tuple[BlockHash, ...]:
    """Chain opaque block ids (a Mooncake trace's `hash_ids`) the same way.

    Trace block ids name a block's content, not its position, so chaining them
    keeps the property that hash i depends on blocks 0..i.
    """
    seed = root_seed(model, cache_salt)
    out = []
    for block_id in ids:
        seed = _xxh(int(block_id).to_bytes(8, "little", signed=True), seed) & _MASK
        out.append(seed)
    return tuple(out)  # type: ignore[return-value]
