"""cluster.yaml, serve_config.yaml and configs/*.yaml are valid for the tools that read them."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from mess_ray.config import load_config

REPO = Path(__file__).resolve().parent.parent


def test_cluster_yaml_matches_ray_cluster_launcher_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    assert cluster["head_node_type"] in cluster["available_node_types"]
    assert "ray-ml" not in cluster["docker"]["image"]
    kinds = cluster["available_node_types"]
    assert any("gpu" in name for name in kinds) and any("cpu" in name for name in kinds)
    # The head schedules and runs no work; GPU types declare their GPUs; preemptible work on spot.
    assert kinds[cluster["head_node_type"]]["resources"]["CPU"] == 0
    assert all(kinds[n]["resources"].get("GPU", 0) >= 1 for n in kinds if "gpu" in n)
    spot = [
        n
        for n, k in kinds.items()
        if k["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    ]
    assert any("cpu" in n for n in spot) and any("gpu" in n for n in spot)
    for name, kind in kinds.items():
        assert 0 <= kind["min_workers"] <= kind["max_workers"] <= cluster["max_workers"], name
    # The image's Ray is the locked one.
    import re

    locked = re.search(
        r"^ray==(\S+)$", (REPO / "requirements.lock").read_text(), re.MULTILINE
    ).group(1)
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{locked}-")


def test_serve_config_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    module_name, attr = app.import_path.split(":")
    builder = getattr(importlib.import_module(module_name), attr)
    deployment_names = {d.name for d in app.deployments}
    # The builder turns the config's args into a Serve application with that deployment.
    args = dict(app.args)
    args["config"] = str(REPO / args["config"])
    application = builder(args)
    assert application._bound_deployment.name in deployment_names
    # Autoscaling on in-flight requests, and room for a full upload batch on each replica.
    deployment = app.deployments[0]
    scaling = deployment.autoscaling_config
    assert scaling["min_replicas"] >= 1 and scaling["max_replicas"] > scaling["min_replicas"]
    assert scaling["target_ongoing_requests"] > 0
    cfg = load_config(args["config"], list(args.get("set") or []))
    assert deployment.max_ongoing_requests >= cfg.serve.batch_max_size
    assert cfg.serve.reload_interval_s > 0


@pytest.mark.parametrize("name", sorted(os.listdir(REPO / "configs")))
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.storage.root
