"""Hard filters: a replica that fails one is never chosen, whatever its score.

model served -> healthy and circuit closed -> allowed region -> not already tried.
When nothing passes, the error says which filter emptied the set, so a client
learns "no replica in your allowed regions" rather than a vague 503.
"""

from __future__ import annotations

import numpy as np

from serving.errors import ModelNotFound, NoReplicaAvailable, ResidencyUnavailable
from serving.routing.table import ReplicaTable
from serving.types import RouteRequest


def candidates(table: ReplicaTable, req: RouteRequest) -> np.ndarray:
    """Indices of the replicas that may serve `req`; raises if there are none."""
    model = table.model_mask(req.model)
    mask = model & table.routable
    if req.allowed_regions is not None:
        mask = mask & table.region_mask(req.allowed_regions)
    if req.exclude:
        mask = mask.copy()
        for rid in req.exclude:
            i = table.index.get(rid)
            if i is not None:
                mask[i] = False
    idx = np.flatnonzero(mask)
    if idx.size:
        return idx
    raise _why_empty(table, req, model)


def _why_empty(table: ReplicaTable, req: RouteRequest, model: np.ndarray) -> Exception:
    if not model.any():
        return ModelNotFound(f"The model `{req.model}` does not exist or has no replicas.",
                             param="model")
    if req.allowed_regions is not None:
        allowed = model & table.region_mask(req.allowed_regions)
        if not allowed.any():
            return ResidencyUnavailable(
                f"No replica of `{req.model}` is deployed in the allowed regions "
                f"{sorted(req.allowed_regions)}.")
        if not (allowed & table.routable).any():
            return ResidencyUnavailable(
                f"No healthy replica of `{req.model}` in the allowed regions "
                f"{sorted(req.allowed_regions)}; the request was not moved elsewhere.")
    if not (model & table.routable).any():
        return NoReplicaAvailable(f"No healthy replica of `{req.model}` is available.")
    return NoReplicaAvailable(f"Every healthy replica of `{req.model}` was already tried.")
