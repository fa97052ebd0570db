"""Session affinity on a consistent-hash ring (as vllm-router's consistent_hash).

Key: the session id, else the tenant and first prompt block, else the request
id. Each replica owns `vnodes` points on a 64-bit ring; a request goes to the
first candidate clockwise from its key, so adding or removing a replica moves
only its own share of sessions, and a filtered-out owner falls through to the
next replica on the ring.
"""

from __future__ import annotations

import bisect

import xxhash

from serving.routing.policies.base import Context, Policy


class ConsistentHash(Policy):
    name = "consistent_hash"

    def __init__(self, vnodes: int = 64) -> None:
        self.vnodes = vnodes
        self._points: list[int] = []
        self._owners: list[str] = []

    def on_membership(self, ids: list[str]) -> None:
        ring = sorted((xxhash.xxh3_64_intdigest(f"{rid}#{v}".encode()), rid)
                      for rid in ids for v in range(self.vnodes))
        self._points = [p for p, _ in ring]
        self._owners = [o for _, o in ring]

    @staticmethod
    def key(ctx: Context) -> str:
        req = ctx.req
        if req.session_id:
            return "s:" + req.session_id
        if req.block_hashes:
            return f"p:{req.tenant}:{req.block_hashes[0]}"
        return "r:" + req.request_id

    def choose(self, ctx: Context) -> tuple[int, str]:
        allowed = {ctx.table.ids[i]: pos for pos, i in enumerate(ctx.cands)}
        if not self._points:
            return 0, "empty ring"
        key = self.key(ctx)
        start = bisect.bisect(self._points, xxhash.xxh3_64_intdigest(key.encode()))
        n = len(self._points)
        for k in range(n):
            owner = self._owners[(start + k) % n]
            pos = allowed.get(owner)
            if pos is not None:
                return pos, f"hash ring owner of {key.split(':', 1)[0]}-key" + (" (fallthrough)" if k else "")
        return 0, "no ring owner among candidates"
