"""The deployment files of cluster/deploy/, checked without a cluster or a network: each parses,
validates against the schema of the tool that reads it, and carries CAVE's conventions."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from tests.cluster.manifests import (
    CHART,
    DEPLOY,
    REPO,
    RenderError,
    cluster_spec,
    env_of,
    group_names,
    head_container,
    load_yaml,
    load_yaml_all,
    only,
    ray_launcher_schema,
    rayservice_validator,
    render,
    serve_config,
    validate_kubernetes,
    worker_group,
)

LAUNCHER = DEPLOY / "ray-cluster.yaml"
BASE_SERVE = REPO / "config" / "serve.yaml"
CUSTOM: dict[str, Any] = {
    "database": {"dsnSecret": {"name": "prod-pg", "key": "url"}},
    "otel_sampling_rate": 0.25,
    "operator_ca_secret": "operator-ca",
    "cosign_key_secret": "cosign",
    "head": {"resources": {"requests": {"cpu": "2", "memory": "6Gi"}}},
    "sandbox": {"capacity": 20, "minReplicas": 2, "maxReplicas": 30},
    "trustedPool": {"enabled": True, "nodeSelector": {"cave.pool": "trusted", "zone": "b"}},
    "gpu": {"acceleratorType": "H100", "gpusPerPod": 2},
    "api": {"autoscaling_config": {"min_replicas": 2, "max_replicas": 8}},
}


@pytest.fixture(scope="module")
def default_objects() -> list[dict]:
    return render()


@pytest.fixture(scope="module")
def custom_objects(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return render(CUSTOM, tmp_path_factory.mktemp("values"))


# --- every file -----------------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = [p for p in DEPLOY.rglob("*.yaml") if "templates" not in p.parts]
    assert {LAUNCHER, DEPLOY / "kuberay" / "rayservice.yaml", CHART / "values.yaml"} <= set(files)
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), path


# --- `ray up` -------------------------------------------------------------------------------


def test_the_launcher_config_passes_rays_own_schema_and_checks() -> None:
    config = load_yaml(LAUNCHER)
    jsonschema.validate(config, ray_launcher_schema())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs first


def test_the_launcher_schema_catches_a_misspelt_node_type_field() -> None:
    config = load_yaml(LAUNCHER)
    config["available_node_types"]["sandbox"]["resource"] = {"cave_sandbox": 50}
    with pytest.raises(jsonschema.ValidationError, match="resource"):
        jsonschema.validate(config, ray_launcher_schema())


def test_launcher_node_types_follow_the_sandbox_and_pool_conventions() -> None:
    types = load_yaml(LAUNCHER)["available_node_types"]
    head = load_yaml(LAUNCHER)["head_node_type"]
    assert "cave_sandbox" not in types[head]["resources"]
    hosts = {name for name, spec in types.items() if spec["resources"].get("cave_sandbox", 0) > 0}
    assert hosts == {"sandbox", "sandbox_trusted"}
    assert types["sandbox_trusted"]["labels"] == {"cave.pool": "trusted"}
    assert "labels" not in types["sandbox"]  # the default pool: no cave.pool label at all
    gpu = types["gpu_inference"]["resources"]
    assert gpu["GPU"] >= 1 and any(key.startswith("accelerator_type:") for key in gpu)


def test_launcher_starts_ray_with_the_haproxy_ingress_and_deploys_the_api() -> None:
    config = load_yaml(LAUNCHER)
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert "RAY_SERVE_ENABLE_HA_PROXY=1" in " ".join(commands)
    head = " ".join(config["head_start_ray_commands"])
    assert "serve deploy cluster/deploy/serve.yaml" in head
    # The DSN and secrets: files of the head, read by the API (test_deploy_security.py).
    assert "/etc/cave/secrets" in " ".join(config["head_setup_commands"])
    assert "/etc/cave/secrets" not in yaml.safe_dump(config["worker_setup_commands"])


# --- Serve configs --------------------------------------------------------------------------


def _production_configs(rayservice: dict) -> dict[str, dict]:
    return {
        "cluster/deploy/serve.yaml": load_yaml(DEPLOY / "serve.yaml"),
        "serveConfigV2": serve_config(rayservice),
    }


def test_production_serve_configs_are_config_serve_yaml_in_substance(
    default_objects: list[dict],
) -> None:
    base = load_yaml(BASE_SERVE)
    (base_app,) = base["applications"]
    (base_ingress,) = base_app["deployments"]
    for name, config in _production_configs(only(default_objects, "RayService")).items():
        ServeDeploySchema.model_validate(config)  # what `serve deploy` / KubeRay accept
        (app,) = config["applications"]
        assert (app["name"], app["import_path"], app["route_prefix"]) == (
            base_app["name"],
            "deployments.http.app:build_app",
            base_app["route_prefix"],
        ), name
        assert config["http_options"] == base["http_options"], name
        (ingress,) = app["deployments"]
        assert ingress["name"] == base_ingress["name"] == "ApiIngress", name
        assert ingress["max_ongoing_requests"] == base_ingress["max_ongoing_requests"], name
        assert ingress["autoscaling_config"]["max_replicas"] >= 1, name
        assert ingress["ray_actor_options"]["resources"] == {"node:__internal_head__": 0.001}
        env = app["args"]["env"]
        assert "BKG_DB_PATH" not in env and env["CAVE_ENV"] == "production", name
        assert set(base_app["args"]["env"]) - {"BKG_DB_PATH"} <= set(env), name


def test_serve_schema_refuses_num_replicas_beside_autoscaling(default_objects: list[dict]) -> None:
    config = serve_config(only(default_objects, "RayService"))
    config["applications"][0]["deployments"][0]["num_replicas"] = 2
    with pytest.raises(ValueError, match="num_replicas"):
        ServeDeploySchema.model_validate(config)


# --- the Helm chart: schemas ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["default", "custom"])
def test_every_rendered_object_validates(
    which: str, default_objects: list[dict], custom_objects: list[dict]
) -> None:
    objects = default_objects if which == "default" else custom_objects
    assert sorted(obj["kind"] for obj in objects) == ["NetworkPolicy", "RayService", "Service"]
    for obj in objects:
        if obj["kind"] == "RayService":
            rayservice_validator().validate(obj)
        else:
            validate_kubernetes(obj)


def test_the_schemas_have_teeth(default_objects: list[dict]) -> None:
    service = copy.deepcopy(only(default_objects, "Service"))
    service["spec"]["ports"][0]["port"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes(service)
    rayservice = copy.deepcopy(only(default_objects, "RayService"))
    head_container(rayservice)["securityContext"]["privileged"] = "no"
    cluster_spec(rayservice)["workerGroupSpecs"][0]["rayStartParam"] = {}
    errors = {e.message for e in rayservice_validator().iter_errors(rayservice)}
    assert any("rayStartParam" in e for e in errors) and any("'no'" in e for e in errors)


def test_the_plain_kuberay_manifest_is_the_charts_default(default_objects: list[dict]) -> None:
    static = load_yaml_all(DEPLOY / "kuberay" / "rayservice.yaml")
    assert static == [only(default_objects, kind) for kind in ("NetworkPolicy", "RayService")]


# --- the Helm chart: values -----------------------------------------------------------------


def test_defaults_give_head_sandbox_and_gpu_groups(default_objects: list[dict]) -> None:
    rayservice = only(default_objects, "RayService")
    spec = cluster_spec(rayservice)
    assert spec["enableInTreeAutoscaling"] is True
    assert "resources" not in spec["headGroupSpec"]  # no cave_sandbox: no sandbox on the head
    assert group_names(rayservice) == ["sandbox", "gpu-inference"]
    assert worker_group(rayservice, "sandbox")["resources"] == {"cave_sandbox": "50"}
    gpu = worker_group(rayservice, "gpu-inference")
    assert gpu["resources"] == {"accelerator_type:L4": "1"}
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "cave.pool" not in yaml.safe_dump(rayservice)  # no trusted pool unless asked


def test_the_database_dsn_comes_from_its_secret_as_a_file(
    default_objects: list[dict], custom_objects: list[dict]
) -> None:
    for objects, ref in (
        (default_objects, ("cave-database", "dsn")),
        (custom_objects, ("prod-pg", "url")),
    ):
        rayservice = only(objects, "RayService")
        assert "BKG_DB_DSN" not in env_of(head_container(rayservice))
        volumes = cluster_spec(rayservice)["headGroupSpec"]["template"]["spec"]["volumes"]
        (projected,) = [v["projected"] for v in volumes if v["name"] == "cave-secrets"]
        sources = [s["secret"] for s in projected["sources"]]
        (dsn,) = [
            (s["name"], i["key"]) for s in sources for i in s["items"] if i["path"] == "db-dsn"
        ]
        assert dsn == ref
        env = serve_config(rayservice)["applications"][0]["args"]["env"]
        assert env["BKG_DB_DSN_FILE"] == "/etc/cave/secrets/db-dsn"


def test_a_dsn_in_plain_values_is_refused(tmp_path: Path) -> None:
    values = {"database": {"dsn": "postgresql://cave:secret@db/cave"}}
    with pytest.raises(RenderError, match="dsn"):
        render(values, tmp_path)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"otel_sampling_rate": 1.5}, "otel_sampling_rate"),
        ({"sandbox": {"capacity": 0}}, "capacity"),
        ({"database": {"dsnSecret": {"name": ""}}}, "dsnSecret/name"),
    ],
)
def test_bad_values_are_refused_naming_the_field(values: dict, field: str, tmp_path: Path) -> None:
    with pytest.raises(RenderError, match=field):
        render(values, tmp_path)


def test_custom_values_reach_their_places(custom_objects: list[dict]) -> None:
    rayservice = only(custom_objects, "RayService")
    env = serve_config(rayservice)["applications"][0]["args"]["env"]
    assert env["CAVE_OTEL_SAMPLING_RATE"] == "0.25"
    ingress = serve_config(rayservice)["applications"][0]["deployments"][0]
    assert ingress["autoscaling_config"]["max_replicas"] == 8
    assert head_container(rayservice)["resources"]["requests"] == {"cpu": "2", "memory": "6Gi"}
    sandbox = worker_group(rayservice, "sandbox")
    assert (sandbox["minReplicas"], sandbox["maxReplicas"]) == (2, 30)
    assert sandbox["resources"] == {"cave_sandbox": "20"}
    gpu = worker_group(rayservice, "gpu-inference")
    assert gpu["resources"] == {"accelerator_type:H100": "1"}
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    mounts = {m["name"]: m for m in head_container(rayservice)["volumeMounts"]}
    assert mounts["operator-ca"]["readOnly"] and mounts["cosign-key"]["readOnly"]
    volumes = {
        v["name"]: v
        for v in cluster_spec(rayservice)["headGroupSpec"]["template"]["spec"]["volumes"]
    }
    assert volumes["operator-ca"]["secret"]["secretName"] == "operator-ca"
    assert volumes["cosign-key"]["secret"]["secretName"] == "cosign"


def test_the_trusted_pool_is_labelled_and_pinned_only_when_enabled(
    default_objects: list[dict], custom_objects: list[dict]
) -> None:
    rayservice = only(custom_objects, "RayService")
    trusted = worker_group(rayservice, "sandbox-trusted")
    assert trusted["labels"] == {"cave.pool": "trusted"}  # the Ray node label
    assert trusted["resources"] == {"cave_sandbox": "50"}
    assert trusted["template"]["spec"]["nodeSelector"] == {"cave.pool": "trusted", "zone": "b"}
    for objects in (default_objects, custom_objects):
        default_pool = worker_group(only(objects, "RayService"), "sandbox")
        assert "labels" not in default_pool
        assert "nodeSelector" not in default_pool["template"]["spec"]


def test_the_api_service_reaches_the_head_pods_serve_port(default_objects: list[dict]) -> None:
    service = only(default_objects, "Service")
    head = cluster_spec(only(default_objects, "RayService"))["headGroupSpec"]["template"]
    assert service["spec"]["selector"].items() <= head["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert ports[service["spec"]["ports"][0]["targetPort"]] == 8000


# --- the Helm chart: pod security -----------------------------------------------------------


def _restricted(pod: dict) -> None:
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = pod["spec"]["containers"][0]["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert not context.get("privileged", False)


def test_head_gpu_and_autoscaler_run_unprivileged(default_objects: list[dict]) -> None:
    rayservice = only(default_objects, "RayService")
    _restricted(cluster_spec(rayservice)["headGroupSpec"]["template"])
    _restricted(worker_group(rayservice, "gpu-inference")["template"])
    autoscaler = cluster_spec(rayservice)["autoscalerOptions"]["securityContext"]
    assert autoscaler["allowPrivilegeEscalation"] is False
    assert autoscaler["seccompProfile"] == {"type": "RuntimeDefault"}


def test_sandbox_pods_are_privileged_by_default(default_objects: list[dict]) -> None:
    pod = worker_group(only(default_objects, "RayService"), "sandbox")["template"]
    context = pod["spec"]["containers"][0]["securityContext"]
    assert (context["privileged"], context["runAsUser"]) == (True, 0)
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "Unconfined"}


def test_sandbox_pods_can_trade_privileged_for_capabilities_and_a_local_profile(
    tmp_path: Path,
) -> None:
    profile = {"type": "Localhost", "localhostProfile": "profiles/cave-sandbox.json"}
    values = {"sandbox": {"security": {"privileged": False, "seccompProfile": profile}}}
    objects = render(values, tmp_path)
    rayservice_validator().validate(only(objects, "RayService"))
    pod = worker_group(only(objects, "RayService"), "sandbox")["template"]
    context = pod["spec"]["containers"][0]["securityContext"]
    assert context["privileged"] is False
    assert "SYS_ADMIN" in context["capabilities"]["add"]
    assert context["seccompProfile"] == profile == pod["spec"]["securityContext"]["seccompProfile"]
