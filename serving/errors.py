"""The one error tree. Every error knows its HTTP status and OpenAI-style body.

    ProximaError (500, server_error)
    ├── InvalidRequest (400, invalid_request_error)
    │   ├── ContextLengthExceeded (400, code=context_length_exceeded)
    │   └── RequestTooLarge (413, code=request_too_large)
    ├── AuthenticationError (401, invalid_request_error, code invalid_api_key: as OpenAI's)
    ├── PermissionDenied (403, permission_error)
    ├── NotFound (404, not_found_error)
    │   └── ModelNotFound (404, code=model_not_found)
    ├── BudgetExceeded (429, code=budget_exceeded, Retry-After)
    ├── RateLimited (429, rate_limit_error, Retry-After)
    ├── NoReplicaAvailable (503, code=no_replica_available, Retry-After)
    │   └── ResidencyUnavailable (503, code=residency_unavailable, Retry-After)
    ├── RouterUnavailable (503, code=router_unavailable, Retry-After)  # restarting past the retry window
    ├── EngineError (502, code=engine_error)  # an engine failed; retriable
    └── Timeout (504, code=timeout)

Third-party exceptions are translated into these at the boundary (ingress,
engines); nothing else leaves a handler.
"""

from __future__ import annotations

import asyncio
from typing import Any


class ProximaError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    @property
    def retriable(self) -> bool:
        return False


class InvalidRequest(ProximaError):
    status, type = 400, "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class RequestTooLarge(InvalidRequest):
    status, code = 413, "request_too_large"


class AuthenticationError(ProximaError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class PermissionDenied(ProximaError):
    status, type = 403, "permission_error"


class NotFound(ProximaError):
    status, type = 404, "not_found_error"


class ModelNotFound(NotFound):
    type, code = "invalid_request_error", "model_not_found"


class _RetryAfter(ProximaError):
    status, type = 429, "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float | None = 1.0, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after_s = None if retry_after_s is None else max(0.0, retry_after_s)
        if self.retry_after_s is not None:  # None: waiting will not help (no Retry-After)
            self.headers.setdefault("Retry-After", str(max(1, int(round(self.retry_after_s + 0.499)))))


class BudgetExceeded(_RetryAfter):
    code = "budget_exceeded"


class RateLimited(_RetryAfter):
    code = "rate_limit_exceeded"


class NoReplicaAvailable(ProximaError):
    """No replica can take the request now (they died, or none is allowed): Serve replaces dead
    replicas within seconds, so the client is told when to try again."""

    status, type, code = 503, "service_unavailable", "no_replica_available"

    def __init__(self, message: str, **kw: Any):
        super().__init__(message, **kw)
        self.headers.setdefault("Retry-After", "1")


class ResidencyUnavailable(NoReplicaAvailable):
    code = "residency_unavailable"


class RouterUnavailable(ProximaError):
    """The central router is down or still rebuilding its view after a restart."""

    status, type, code = 503, "service_unavailable", "router_unavailable"

    def __init__(self, message: str, **kw: Any):
        super().__init__(message, **kw)
        self.headers.setdefault("Retry-After", "1")


class LedgerUnavailable(RouterUnavailable):
    """The budget ledger did not answer a reservation in time (it is restarting or stalled)."""

    code = "ledger_unavailable"


class EngineError(ProximaError):
    status, type, code = 502, "server_error", "engine_error"

    @property
    def retriable(self) -> bool:
        return True


class Timeout(ProximaError):
    status, type, code = 504, "server_error", "timeout"


def quoted(value: str, most: int = 128) -> str:
    """A client's value as an error message quotes it: at most `most` characters (a 2 MB model
    name is not sent back whole)."""
    return f"`{value}`" if len(value) <= most else f"`{value[:most]}...` ({len(value)} characters)"


def cancelled(e: BaseException | None) -> bool:
    """Work that ended because its reader went away (the client left, or the request was
    cancelled), not by an error of its own."""
    return isinstance(e, (GeneratorExit, asyncio.CancelledError))
