"""The Serve application builder: `serve run deployments/local.yaml`.

    build_app(args) -> Application

`args` is the Proxima config (serving.config: home_region, rtt_ms, router,
models, regions, auth, serve), inline under the application's `args:`, or
`{config_path: file.yaml}` pointing at one. It builds:

- one engine deployment per region and model (`engine-<region>-<model>`),
  `num_replicas` = the region's replicas, routed by serving.ray.request_router:
  DecisionRouter so each call reaches the replica the central router chose;
  with `serve.region_resources` each is pinned by its region's Ray resource;
- the ingress deployment (the OpenAI API), holding handles to all of them;
- with an `autoscaler:` section, the autoscaler controller (serving.ray.autoscaler),
  which sets the engine deployments' replica counts through Serve's controller:
  deploy the app with `external_scaler_enabled: true`.

The router actor is created by the first replica that needs it (see
serving.ray.router_actor), not here: with a config file this builder runs in a
short-lived task that would take a non-detached actor down with it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from serving.config import ConfigError, load_config
from serving.ray.autoscaler import AutoscalerDeployment
from serving.ray.engine import EngineDeployment
from serving.ray.ingress import IngressDeployment, engine_key
from serving.ray.router_actor import shared_config

ROUTER_CLASS = "serving.ray.request_router:DecisionRouter"


def engine_name(region: str, model: str) -> str:
    return "engine-" + re.sub(r"[^A-Za-z0-9_-]+", "-", f"{region}-{model}")


def _config_dict(args: dict[str, Any]) -> dict[str, Any]:
    args = dict(args or {})
    path = args.pop("config_path", None)
    if path is not None:
        if args:
            raise ValueError(f"args: give either config_path or an inline config, not both ({sorted(args)})")
        try:
            return yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"config_path: cannot read {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config_path: {path} is not valid YAML: {e}") from None
    return args


def build_app(args: dict[str, Any]) -> Application:
    raw = _config_dict(args)
    cfg = load_config(raw)  # fail here, naming the key, before anything is deployed
    shared = shared_config(raw)  # engines and the autoscaler never see `auth` (keys' hashes, tenants)
    engines = {}
    for region, r in cfg.regions.items():
        if r.replicas == 0:
            continue
        for model in cfg.region_models(region):
            shape = r.placement(model)  # e.g. {num_gpus: 1}; bundles for tensor parallelism
            actor: dict[str, Any] = {"num_cpus": 0, **shape.ray_actor_options}
            if cfg.serve.region_resources:  # a sliver: placement, not capacity
                actor["resources"] = {**actor.get("resources", {}), r.ray_resource: 0.001}
            placement: dict[str, Any] = {}
            if shape.placement_group_bundles:  # the replica and its GPU ranks, packed together
                bundles = [dict(b) for b in shape.placement_group_bundles]
                for res, amount in actor.get("resources", {}).items():  # the replica sits in bundle 0
                    bundles[0][res] = max(bundles[0].get(res, 0), amount)
                placement = {"placement_group_bundles": bundles,
                             "placement_group_strategy": r.placement_group_strategy}
            engines[engine_key(region, model)] = EngineDeployment.options(
                name=engine_name(region, model), num_replicas=r.replicas,
                max_ongoing_requests=cfg.serve.engine_max_ongoing_requests,
                ray_actor_options=actor, **placement,
                request_router_config=RequestRouterConfig(request_router_class=ROUTER_CLASS),
            ).bind(shared, region, model)
    autoscaler = None
    if cfg.autoscaler is not None:  # needs the app deployed with external_scaler_enabled: true
        autoscaler = AutoscalerDeployment.options(name="autoscaler").bind(
            shared, {k: engine_name(*k.split("/", 1)) for k in engines})
    return IngressDeployment.options(
        name="ingress", num_replicas=cfg.serve.ingress_replicas,
        max_ongoing_requests=cfg.serve.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    ).bind(raw, engines, autoscaler)
