"""Agent-step records: what happened to each request of an agent session.

A request that carries `x-session-id` leaves one record when it is accounted
(see observer.step_record): where it went and why, cached tokens, queue wait,
tokens in and out, the budget charged, its trace id. `GET
/v1/sessions/{id}/steps` returns the caller's own session, oldest step first.

Memory is bounded twice: each session keeps its last `max_steps` records
(older ones drop off, `dropped` says how many), and at most `max_sessions`
sessions are kept: past that, the least recently written session of the tenant
that keeps the most is evicted (one tenant's flood of sessions evicts its own). Sessions are keyed by
(tenant, session id), so one tenant can neither read nor overwrite another's
session of the same name: an unknown key is simply not found (404).
One writer: the ingress event loop in-process, or the telemetry actor.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from typing import Any

from serving.errors import InvalidRequest

SESSION_HEADER, STEP_HEADER = "x-session-id", "x-agent-step"
_SAFE = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces, as request ids


def check_headers(session_id: str | None, step: str | None) -> None:
    """400 for a session id or step label a client should not send (too long, control chars)."""
    if session_id is not None and not _SAFE.match(session_id):
        raise InvalidRequest("`x-session-id` must be 1-128 printable ASCII characters without spaces.",
                             param=SESSION_HEADER)
    if step is not None and not _SAFE.match(step):
        raise InvalidRequest("`x-agent-step` must be 1-128 printable ASCII characters without spaces.",
                             param=STEP_HEADER)


class _Session:
    __slots__ = ("steps", "count")

    def __init__(self, max_steps: int):
        self.steps: deque[dict[str, Any]] = deque(maxlen=max_steps)
        self.count = 0


class StepStore:
    """The last `max_steps` steps of up to `max_sessions` sessions. Past that, the least recently
    used session of the tenant that keeps the most goes: a tenant naming new sessions by the
    thousand evicts its own, not another tenant's."""

    def __init__(self, max_sessions: int = 10_000, max_steps: int = 256):
        if max_sessions < 1 or max_steps < 1:
            raise ValueError("max_sessions and max_steps must be >= 1")
        self.max_sessions, self.max_steps = max_sessions, max_steps
        self._tenants: dict[str, OrderedDict[str, _Session]] = {}  # each tenant's, least recent first
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, tenant: str, session_id: str, record: dict[str, Any]) -> None:
        sessions = self._tenants.setdefault(tenant, OrderedDict())
        s = sessions.get(session_id)
        if s is None:
            s = sessions[session_id] = _Session(self.max_steps)
            self._count += 1
            while self._count > self.max_sessions:
                biggest = max(self._tenants, key=lambda t: len(self._tenants[t]))
                self._tenants[biggest].popitem(last=False)
                self._count -= 1
                if not self._tenants[biggest]:
                    del self._tenants[biggest]
        else:
            sessions.move_to_end(session_id)
        s.count += 1
        s.steps.append({**record, "n": s.count})

    def add_many(self, batch: list[tuple[str, str, dict[str, Any]]]) -> None:
        for tenant, session_id, record in batch:
            self.add(tenant, session_id, record)

    def get(self, tenant: str, session_id: str) -> dict[str, Any] | None:
        """The session's body for the API, or None when this tenant has no such session."""
        s = self._tenants.get(tenant, {}).get(session_id)
        if s is None:
            return None
        steps = list(s.steps)
        return {"object": "list", "session_id": session_id, "data": steps,
                "total_steps": s.count, "dropped": s.count - len(steps)}
