"""Tenant isolation in the prefix cache: one cache salt per tenant.

vLLM (and the sim engine, and the router's prefix index) seed the first block
hash with `cache_salt`, so two tenants sending the same prompt get different
block hashes: neither can learn from a faster first token that the other sent
that prompt. The salt is an HMAC of the tenant name under the server's secret,
so it can't be guessed from outside. Tenants that opt in (`cache: shared`)
use one shared salt instead, to share warm caches of public system prompts;
they only ever share with other tenants that opted in.
"""

from __future__ import annotations

import hashlib
import hmac

SHARED = "shared"
PRIVATE = "private"


def cache_salt(tenant: str, secret: bytes | str, scope: str = PRIVATE) -> str:
    if scope not in (SHARED, PRIVATE):
        raise ValueError(f"cache scope must be {PRIVATE!r} or {SHARED!r}, got {scope!r}")
    key = secret.encode() if isinstance(secret, str) else secret
    msg = b"proxima-shared-cache" if scope == SHARED else b"tenant:" + tenant.encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()[:32]
