"""Ray Serve's request-path settings: environment variables read when Ray's processes start.

    SERVE_ENV          the settings, as Ray Serve names them
    apply_serve_env()  sets any of them the environment does not set already
    python -m serving.ray.runtime CMD...   runs CMD with them (`make run` does), and
                                           turns a SIGTERM into the SIGINT it stops cleanly on

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

Process managers (docker stop, systemd, Kubernetes) stop a program with
SIGTERM. `serve run` dies on it at once, with Ray's signal handler printing a
stack, and the ingress never drains (budget charges still being recorded are
left to the ledger's TTL). On SIGINT (Ctrl-C) it shuts Serve down gracefully:
each ingress replica finishes its charges and telemetry. So the command runs as
a child, and a SIGTERM to this process reaches it as SIGINT (a second one as
SIGTERM); a Ctrl-C in a terminal reaches the child directly (its process
group), so this process only waits, and exits with the child's status.
"""

from __future__ import annotations

import os
import signal
import subprocess
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
    first = iter([signal.SIGINT])  # next() is one step: a SIGTERM inside the handler sees it taken
    child: subprocess.Popen | None = None

    def stop(*_: object) -> None:  # the first SIGTERM asks the child to stop; another one insists
        sig = next(first, signal.SIGTERM)
        if child is not None:
            child.send_signal(sig)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C reaches the child itself
    # SIGINT as Python's default in the child even where this process was started with it
    # ignored (a background job of a non-interactive shell): it is how the child is stopped
    child = subprocess.Popen(argv, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    raise SystemExit(child.wait())


if __name__ == "__main__":
    main()
