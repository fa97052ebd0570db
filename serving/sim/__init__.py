"""Discrete-event simulator: the real router against simulated replicas, in virtual time.

    python -m serving.sim run SCENARIO.yaml --out DIR [--policy NAME ...]
    python -m serving.sim trace SCENARIO.yaml --out trace.jsonl

See docs/simulation.md for the scenario format and what each metric means.
"""

from serving.sim.loop import Hooks, Simulator, run_policies
from serving.sim.scenario import Scenario, ScenarioError, load, parse

__all__ = ["Hooks", "Scenario", "ScenarioError", "Simulator", "load", "parse", "run_policies"]
