"""Authentication: `Authorization: Bearer <key>` -> the tenant it belongs to.

Keys are never stored: the config holds sha256 hex digests. A presented key is
hashed and compared with every stored digest using hmac.compare_digest, and
the loop never stops early, so the time taken does not reveal which digest (or
how much of one) matched. With no tenant keys configured the gateway runs open
(every request is tenant `default`) and says so once at start.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

from serving.config import AuthConfig
from serving.errors import AuthenticationError, PermissionDenied

log = logging.getLogger("proxima.auth")
OPEN_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    allowed_regions: frozenset[str] | None = None  # None = anywhere
    admin: bool = False


def hash_key(key: str) -> str:
    """The digest to put in the config for an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


class Authenticator:
    def __init__(self, config: AuthConfig):
        self._entries: list[tuple[bytes, Principal]] = []
        for name, t in config.tenants.items():
            p = Principal(name, frozenset(t.allowed_regions) if t.allowed_regions is not None else None)
            self._entries += [(bytes.fromhex(h), p) for h in t.api_keys_sha256]
        self._admin = bytes.fromhex(config.admin_key_sha256) if config.admin_key_sha256 else None
        self.open = not self._entries
        if self.open:
            log.warning("no API keys configured: the gateway is OPEN, every request is tenant %r",
                        OPEN_TENANT)

    def authenticate(self, authorization: str | None) -> Principal:
        if self.open:
            return Principal(OPEN_TENANT)
        digest = self._digest(authorization)
        found: Principal | None = None
        for stored, p in self._entries:  # no early exit: constant time in the match position
            if hmac.compare_digest(stored, digest):
                found = p
        if found is None:
            raise AuthenticationError("Incorrect API key provided." if authorization
                                      else "Missing API key: send `Authorization: Bearer <key>`.")
        return found

    def require_admin(self, authorization: str | None) -> None:
        """Admin endpoints: need the admin key when one is configured; else only open gateways allow them."""
        if self._admin is None:
            if self.open:
                return
            raise PermissionDenied("Admin endpoints are disabled: no admin key is configured.")
        if not hmac.compare_digest(self._admin, self._digest(authorization)):
            raise AuthenticationError("Incorrect admin key provided.")

    @staticmethod
    def _digest(authorization: str | None) -> bytes:
        key = ""
        if authorization and authorization[:7].lower() == "bearer ":
            key = authorization[7:].strip()
        return hashlib.sha256(key.encode()).digest()
