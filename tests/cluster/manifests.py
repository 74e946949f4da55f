"""Rendering and schema checks for the deployment files: a real helm, Kubernetes' own JSON
schemas (kubernetes-validate), Ray's launcher schema and Serve's config schema."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "cluster" / "deploy"
CHART = DEPLOY / "helm" / "cave"
KUBERNETES_VERSION = "1.35"  # the schemas kubernetes-validate ships for it, strict variant
_K8S_DEFS = f"kubernetes-json-schema/v{KUBERNETES_VERSION}.0-local-strict/_definitions.json"


def helm() -> str:
    """The helm that `make install` put in the venv (tests/cluster/install_helm.py), else PATH."""
    found = REPO / ".venv" / "bin" / "helm"
    path = str(found) if found.exists() else shutil.which("helm")
    if path is None:
        pytest.fail("no helm: run `.venv/bin/python tests/cluster/install_helm.py .venv/bin/helm`")
    return path


class RenderError(Exception):
    """`helm template` refused the chart or its values; the message is helm's."""


def render(values: dict[str, Any] | None = None, tmp_path: Path | None = None) -> list[dict]:
    """The chart's objects for `values` (None: the chart's defaults), as `helm template` makes."""
    command = [helm(), "template", "cave", str(CHART)]
    if values is not None:
        assert tmp_path is not None, "custom values need a directory for their file"
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        command += ["--values", str(values_file)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def only(objects: list[dict], kind: str) -> dict:
    (found,) = [obj for obj in objects if obj["kind"] == kind]
    return found


def validate_kubernetes(obj: dict) -> None:
    """Raises kubernetes_validate.ValidationError where `obj` breaks its kind's schema."""
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def rayservice_validator() -> jsonschema.Draft202012Validator:
    """tests/cluster/rayservice_schema.yaml (reduced, see its header) over the real Kubernetes
    definitions it refers to for pod templates and their parts."""
    defs_text = (resources.files(kubernetes_validate) / _K8S_DEFS).read_text()
    definitions = json.loads(defs_text)
    schema = yaml.safe_load((Path(__file__).with_name("rayservice_schema.yaml")).read_text())
    registry: Registry = Registry().with_resource(
        definitions["$id"], Resource.from_contents(definitions)
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def ray_launcher_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def cluster_spec(rayservice: dict) -> dict:
    return rayservice["spec"]["rayClusterConfig"]


def worker_group(rayservice: dict, name: str) -> dict:
    (group,) = [g for g in cluster_spec(rayservice)["workerGroupSpecs"] if g["groupName"] == name]
    return group


def group_names(rayservice: dict) -> list[str]:
    return [g["groupName"] for g in cluster_spec(rayservice)["workerGroupSpecs"]]


def head_container(rayservice: dict) -> dict:
    container: dict = cluster_spec(rayservice)["headGroupSpec"]["template"]["spec"]["containers"][0]
    return container


def env_of(container: dict) -> dict[str, dict]:
    """A container's env entries by name."""
    return {entry["name"]: entry for entry in container.get("env", [])}


def serve_config(rayservice: dict) -> dict:
    config: dict = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    return config


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def pod_templates(rayservice: dict) -> dict[str, dict]:
    """Every pod template of the RayService by group: `head` and each worker group's name."""
    spec = cluster_spec(rayservice)
    templates = {"head": spec["headGroupSpec"]["template"]}
    for group in spec.get("workerGroupSpecs", []):
        templates[group["groupName"]] = group["template"]
    return templates
