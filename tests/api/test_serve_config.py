"""config/serve.yaml is a valid Serve config whose application builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.app import build_app

CONFIG = Path(__file__).parents[2] / "config" / "serve.yaml"


def test_the_config_validates_and_its_app_builds() -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (app,) = config.applications
    assert app.import_path == "deployments.app:build_app"
    assert build_app(app.args) is not None


def test_unknown_args_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown build_app args"):
        build_app({"evn": {}})
