"""Data residency: the regions a request may be served in.

    effective = tenant.allowed_regions ∩ header regions   (header may only narrow)

`None` means "anywhere" (the tenant has no residency rule and the request asks
for none). A header naming a region outside the tenant's set is refused with
403 rather than silently ignored: the client asked for something it may not
have. The result goes into `RouteRequest.allowed_regions`, a hard router filter,
and every later path (retry, failover, continuation, delegation) routes with
the same RouteRequest field, so none of them can leave it.
"""

from __future__ import annotations

from serving.errors import InvalidRequest, PermissionDenied

HEADER = "x-proxima-regions"


def parse_regions(value: str | None) -> frozenset[str] | None:
    if value is None or not value.strip():
        return None
    regions = frozenset(r.strip() for r in value.split(",") if r.strip())
    if not regions:
        raise InvalidRequest(f"Header `{HEADER}` names no region.", param=HEADER)
    return regions


def effective_regions(tenant_allowed: frozenset[str] | None,
                      header_value: str | None) -> frozenset[str] | None:
    asked = parse_regions(header_value)
    if asked is None:
        return tenant_allowed
    if tenant_allowed is None:
        return asked
    outside = asked - tenant_allowed
    if outside:
        raise PermissionDenied(
            f"Region(s) {sorted(outside)} are outside this tenant's allowed regions "
            f"{sorted(tenant_allowed)}; `{HEADER}` may only narrow them.", param=HEADER,
            code="region_not_allowed")
    return asked


def allowed(region: str, regions: frozenset[str] | None) -> bool:
    return regions is None or region in regions
