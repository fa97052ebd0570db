"""Ray Serve's request-path settings: environment variables read when Ray's processes start.

    SERVE_ENV          the settings, as Ray Serve names them
    apply_serve_env()  sets any of them the environment does not set already
    python -m serving.ray.runtime CMD...   runs CMD with them (`make run` does)

Ray Serve ships them as part of its `RAY_SERVE_THROUGHPUT_OPTIMIZED` preset.
That preset also turns on direct ingress (each ingress replica serves HTTP on
port 8000 itself, no proxy), a different topology; these are the rest, which
keep Serve's proxy:

- user code and the handle's router run on the replica's own event loop
  instead of a thread and a loop of their own, saving two thread hand-offs on
  every call and every streamed item (Proxima's replicas never block their
  loop);
- calls between deployments (ingress -> engine) and from the proxy go over
  gRPC between replicas instead of Ray actor tasks;
- request-path log lines are buffered (1000) instead of flushed one by one,
  and not copied to stderr.

They must be in the environment of the process that starts Ray (`ray start`,
`serve run`, the KubeRay container), so every Serve process inherits them;
the gateway benchmark sets them before its `ray.init`, for both apps alike.
Measured effect in docs/configuration.md.
"""

from __future__ import annotations

import os
import sys
from typing import MutableMapping

SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_LOG_TO_STDERR": "0",
}


def apply_serve_env(env: MutableMapping[str, str] = os.environ) -> None:
    for k, v in SERVE_ENV.items():
        env.setdefault(k, v)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m serving.ray.runtime serve run deployments/local.yaml")
    apply_serve_env()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
