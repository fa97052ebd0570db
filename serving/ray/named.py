"""The app's named, detached actors (router, ledger, telemetry) when one is gone for good.

Ray restarts a crashed one by itself (max_restarts=-1): calls meanwhile raise
ActorUnavailableError, and waiting is the answer. One killed without restart
(the router exits when its app is gone and takes the app's ledger and
telemetry with it) raises ActorDiedError forever: its clients find it again
by name, or create it afresh, through their `reconnect`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from ray.exceptions import ActorUnavailableError, RayActorError


async def find_again(e: BaseException, reconnect: Callable[[], Any] | None) -> Any | None:
    """A fresh handle if `e` says the actor is gone for good and `reconnect` is given, else None."""
    if reconnect is None or not isinstance(e, RayActorError) or isinstance(e, ActorUnavailableError):
        return None
    return await asyncio.to_thread(reconnect)  # a GCS lookup (and maybe a creation): off the loop
