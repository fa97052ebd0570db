"""`python -m serving.ray.runtime CMD`: Serve's settings in CMD's environment, and a SIGTERM
(docker stop, systemd) handed to CMD as the SIGINT `serve run` stops gracefully on."""

import signal
import subprocess
import sys

CHILD = """
import os, signal, sys, time
signal.signal(signal.SIGINT, lambda *_: (print("graceful", flush=True), sys.exit(3)))
signal.signal(signal.SIGTERM, lambda *_: (print("killed", flush=True), sys.exit(9)))
print(os.environ.get("RAY_SERVE_USE_GRPC_BY_DEFAULT"), flush=True)
time.sleep(30)
"""


def _wrapped(child: str) -> subprocess.Popen:
    # started as a background job of a non-interactive shell is: with SIGINT ignored
    return subprocess.Popen([sys.executable, "-m", "serving.ray.runtime", sys.executable, "-c", child],
                            stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


def test_a_sigterm_reaches_the_command_as_sigint_and_its_status_comes_back():
    p = _wrapped(CHILD)
    assert p.stdout.readline().strip() == "1"  # the Serve settings reached it
    p.send_signal(signal.SIGTERM)
    assert p.stdout.readline().strip() == "graceful"
    assert p.wait(10) == 3


def test_a_second_sigterm_insists():
    p = _wrapped(CHILD.replace('sys.exit(3)', 'None'))  # a child that does not stop on SIGINT
    assert p.stdout.readline().strip() == "1"
    p.send_signal(signal.SIGTERM)
    assert p.stdout.readline().strip() == "graceful"
    p.send_signal(signal.SIGTERM)
    assert p.stdout.readline().strip() == "killed" and p.wait(10) == 9


def test_without_a_command_it_says_how_to_use_it():
    r = subprocess.run([sys.executable, "-m", "serving.ray.runtime"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "usage" in r.stderr
