"""Autoscaling: a pure policy that moves replicas toward demand (policy.py, model.py),
cache-aware scale-down and warm start (cache.py), the demand window (window.py),
Ray Serve's own target_ongoing_requests policy modelled for comparison (serve_baseline.py),
and the simulator's control loops (sim.py)."""
