"""config/serve.yaml is a valid Serve config whose application builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.http.app import build_app

CONFIG = Path(__file__).parents[2] / "config" / "serve.yaml"


def test_the_config_validates_and_its_app_builds() -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (app,) = config.applications
    assert app.import_path == "deployments.http.app:build_app"
    assert build_app(app.args) is not None


def test_unknown_args_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown build_app args"):
        build_app({"evn": {}})


def test_the_api_scales_by_the_configs_autoscaling_config() -> None:
    from cluster.api import api_autoscaling

    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (ingress,) = [d for d in config.applications[0].deployments if d.name == "ApiIngress"]
    autoscaling = api_autoscaling(CONFIG)
    assert autoscaling == ingress.autoscaling_config
    assert autoscaling["max_replicas"] > autoscaling["min_replicas"] >= 1
    app = build_app({"env": {}, "autoscaling": autoscaling})
    config_of = app._bound_deployment._deployment_config  # what Serve will deploy
    assert config_of.autoscaling_config.max_replicas == autoscaling["max_replicas"]


def test_replicas_are_fixed_or_autoscaled_not_both() -> None:
    with pytest.raises(ValueError, match="not both"):
        build_app({"num_replicas": 2, "autoscaling": {"min_replicas": 1, "max_replicas": 2}})
