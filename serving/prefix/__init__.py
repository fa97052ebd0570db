"""Prefix hashing and the prefix index (which replica holds which blocks)."""

from serving.prefix.hashing import BlockHash, block_hashes, hashes_from_ids, root_seed
from serving.prefix.index import PrefixIndex

__all__ = ["BlockHash", "PrefixIndex", "block_hashes", "hashes_from_ids", "root_seed"]
