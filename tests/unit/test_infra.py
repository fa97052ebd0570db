"""infra/: every file parses; the RayService and launcher place each region's engines on that
region's nodes; every Grafana panel queries a metric the gateway really exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from obs_helpers import ACME, FrozenRouter, build, chat
from serving.observability.dashboard import check, metric_names, queries

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DASHBOARD = INFRA / "grafana" / "proxima-dashboard.json"


def _yaml(rel: str):
    return yaml.safe_load((INFRA / rel).read_text())


@pytest.mark.parametrize("path", sorted(str(p.relative_to(INFRA)) for p in INFRA.rglob("*")
                                        if p.suffix in (".yaml", ".yml", ".json")))
def test_every_infra_file_parses(path):
    text = (INFRA / path).read_text()
    doc = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    assert isinstance(doc, dict) and doc


@pytest.mark.parametrize("expr,names", [
    pytest.param("sum(rate(a_total[5m]))", {"a_total"}, id="rate"),
    pytest.param('histogram_quantile(0.9, sum by (le, region) (rate(h_bucket{region=~"$r"}[$__rate_interval])))',
                 {"h_bucket"}, id="quantile-by-matchers"),
    pytest.param("x / ignoring(source) group_left sum(y)", {"x", "y"}, id="vector-matching"),
    pytest.param("sum(a) / clamp_min(sum(b), 1e-9)", {"a", "b"}, id="number-literal"),
    pytest.param('max by (tenant) (used{t="by"} / limit)', {"used", "limit"}, id="keyword-in-string"),
])
def test_promql_metric_names(expr, names):
    assert metric_names(expr) == names


async def _live_exposition() -> str:
    """/metrics of a real in-process gateway after ok, refused, failed-over and cached requests."""
    c, engines, _ = build(router_cls=FrozenRouter)
    prompt = " ".join(f"w{i}" for i in range(300))
    for _ in range(2):
        assert (await c.post("/v1/chat/completions", json=chat(prompt), headers=ACME)).status_code == 200
    assert (await c.post("/v1/chat/completions", content=b"{", headers=ACME)).status_code == 400
    engines["us-0"].kill()
    engines["us-1"].kill()
    assert (await c.post("/v1/chat/completions", json=chat(), headers=ACME)).status_code == 200
    return (await c.get("/metrics")).text


async def test_every_dashboard_panel_queries_a_metric_the_gateway_exports():
    dash = json.loads(DASHBOARD.read_text())
    res = check(dash, await _live_exposition())
    assert res["missing"] == [] and res["without_query"] == []
    assert len(res["queries"]) >= len(dash["panels"])
    used = set().union(*(set(q["metrics"]) for q in res["queries"]))
    # the list, each on the dashboard
    for m in ("proxima_requests_total", "proxima_errors_total", "proxima_ttft_seconds_bucket",
              "proxima_tpot_seconds_bucket", "proxima_e2e_seconds_bucket",
              "proxima_routing_decision_seconds_bucket", "proxima_ttft_predicted_seconds_sum",
              "proxima_ttft_observed_seconds_sum", "proxima_cached_tokens_total",
              "proxima_engine_prefix_cache_hits_total", "proxima_budget_used_tokens",
              "proxima_delegation_total", "proxima_retries_total", "proxima_failovers_total",
              "proxima_replicas", "proxima_replica_queue_depth"):
        assert m in used, m


async def test_the_check_catches_a_renamed_metric():
    dash = json.loads(DASHBOARD.read_text())
    dash["panels"][0]["targets"][0]["expr"] = "sum(rate(proxima_request_total[5m]))"
    res = check(dash, await _live_exposition())
    assert res["missing"] == [{"panel": dash["panels"][0]["title"], "metric": "proxima_request_total"}]


def test_dashboard_variables_and_panels_are_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "region", "tenant"}
    assert any(title.startswith("variable $") for title, _ in queries(dash))


# --- KubeRay RayService --------------------------------------------------------------------
def _rayservice():
    doc = _yaml("kuberay/rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    return doc, yaml.safe_load(doc["spec"]["serveConfigV2"])


@pytest.fixture
def salt_env(monkeypatch):
    monkeypatch.setenv("PROXIMA_CACHE_SALT", "test-secret")  # the config reads its salt key from here


def test_rayservice_gives_every_pod_the_cache_salt_key_from_a_secret():
    """The config names the key's variable (Serve logs the config): every pod, the head that
    builds the app and the engines' workers, has it from a Kubernetes Secret, never in clear."""
    doc, serve_cfg = _rayservice()
    name = serve_cfg["applications"][0]["args"]["auth"]["cache_salt_secret_env"]
    spec = doc["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for pod in pods:
        (c,) = pod["template"]["spec"]["containers"]
        env = {e["name"]: e for e in c.get("env", ())}
        assert "secretKeyRef" in env[name]["valueFrom"] and "value" not in env[name]


def _group_resources(group: dict) -> dict:
    raw = group["rayStartParams"]["resources"]
    return json.loads(json.loads(raw))  # KubeRay's quoted JSON string


def test_rayservice_serve_config_is_valid_and_names_an_importable_builder(salt_env):
    pytest.importorskip("ray")
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import build_app
    from serving.config import load_config

    _, serve_cfg = _rayservice()
    ServeDeploySchema.model_validate(serve_cfg) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(serve_cfg)
    (app,) = serve_cfg["applications"]
    module, attr = app["import_path"].split(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is build_app
    cfg = load_config(app["args"])
    assert cfg.serve.region_resources and not cfg.serve.inject_rtt


def test_rayservice_places_each_regions_engines_on_its_worker_group(salt_env):
    pytest.importorskip("ray")
    from ray.serve._private.build_app import build_app as serve_build

    from deployments.app import build_app

    doc, serve_cfg = _rayservice()
    groups = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    offered = {}
    for g in groups:
        (res,) = _group_resources(g)
        region = g["labels"]["proxima.io/region"]
        assert res == f"region-{region}"
        gpus = int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        offered[res] = gpus
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    args = serve_cfg["applications"][0]["args"]
    graph = serve_build(build_app(args), name="proxima").deployments
    engines = [d for d in graph if d.name.startswith("engine-")]
    assert {d.name for d in engines} == {f"engine-{r}-llama3-8b" for r in args["regions"]}
    for d in engines:
        opts = d.ray_actor_options
        (res,) = opts["resources"]
        assert res in offered, f"{d.name} asks for {res}, which no worker group offers"
        assert opts.get("num_gpus", 0) <= offered[res]
    ingress = next(d for d in graph if d.name == "ingress")
    assert ingress.num_replicas == args["serve"]["ingress_replicas"]


# --- Ray cluster launcher --------------------------------------------------------------------
def test_cluster_launcher_yaml_validates_against_rays_schema_and_offers_every_region():
    ray = pytest.importorskip("ray")
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = _yaml("ray/cluster.yaml")
    jsonschema.validate(cfg, schema)
    offered = {r for t in cfg["available_node_types"].values() for r in t["resources"]
               if r.startswith("region-")}
    gpu = yaml.safe_load((ROOT / "deployments" / "gpu.yaml").read_text())["applications"][0]["args"]
    assert {r["ray_resource"] for r in gpu["regions"].values()} <= offered
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"]["CPU"] == 0


# --- Prometheus ------------------------------------------------------------------------------
def test_prometheus_scrapes_the_gateway_metrics_path_once_per_cluster():
    cfg = _yaml("prometheus/prometheus.yml")
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert len(jobs) == len(cfg["scrape_configs"])
    for name in ("proxima-gateway", "proxima-gateway-local"):
        assert jobs[name]["metrics_path"] == "/metrics"
    assert jobs["proxima-gateway-local"]["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    (svc,) = jobs["proxima-gateway"]["static_configs"][0]["targets"]
    assert svc.startswith("proxima-serve-svc.")  # KubeRay's <rayservice>-serve-svc: one target
    ray_job = jobs["ray"]
    assert any(r.get("replacement") == "$1:8080" for r in ray_job["relabel_configs"])


def test_dashboard_check_says_what_a_refused_scrape_needs(capsys):
    """A gateway with metrics_auth: admin refuses the check without the admin key: a clear line
    naming PROXIMA_ADMIN_KEY, not a traceback."""
    import http.server
    import threading

    from serving.observability.dashboard import main

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        rc = main([str(ROOT / "infra/grafana/proxima-dashboard.json"),
                   f"http://127.0.0.1:{srv.server_port}/metrics"])
    finally:
        srv.shutdown()
    err = capsys.readouterr().err
    assert rc == 2 and "HTTP 401" in err and "PROXIMA_ADMIN_KEY" in err and "Traceback" not in err
