"""The security of the shipped cluster files, checked on what helm renders and on the files as
written: Ray token auth on every Ray node, no secret in any Ray process's environment, no
Service or firewall rule that exposes Ray's own ports, a NetworkPolicy that lets only the API
port in from outside, secrets mounted read-only as files of the head alone. Each check is a
function that lists the problems of a deployment, and each has a test that breaks the files
the way a careless edit would and sees the check fail."""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.cluster.manifests import (
    DEPLOY,
    cluster_spec,
    head_container,
    load_yaml,
    load_yaml_all,
    only,
    pod_templates,
    render,
    serve_config,
    validate_kubernetes,
)

LAUNCHER = DEPLOY / "ray-cluster.yaml"
STATIC = DEPLOY / "kuberay" / "rayservice.yaml"
SECRETS = ("BKG_DB_DSN", "CAVE_KEY_PEPPER", "CAVE_SECRET_KEY", "CAVE_AUDIT_LOG_HMAC_KEY")
OPTIONAL_SECRETS = ("CAVE_ROTATION_WEBHOOK_SECRET",)
RAY_PORTS = {6379, 8265, 10001, "gcs", "dashboard", "client"}  # GCS, dashboard/Jobs, Ray Client
API_PORT = 8000
DASHBOARD_PORT = 8265


# --- Kubernetes: the checks ---------------------------------------------------------------


def kubernetes_problems(objects: list[dict]) -> list[str]:
    """Everything that leaves a chart-made (or kubectl-applied) deployment less than secured."""
    rayservice = only(objects, "RayService")
    return [
        *_token_auth_problems(rayservice),
        *_environment_problems(rayservice),
        *_exposure_problems(objects, rayservice),
        *_network_policy_problems(objects, rayservice),
        *_secret_volume_problems(rayservice),
    ]


def _token_auth_problems(rayservice: dict) -> list[str]:
    problems = []
    if cluster_spec(rayservice).get("authOptions", {}).get("mode") != "token":
        problems.append("rayClusterConfig.authOptions.mode is not token")
    for group, pod in pod_templates(rayservice).items():
        for container in pod["spec"]["containers"]:
            mode = [e for e in container.get("env", []) if e["name"] == "RAY_AUTH_MODE"]
            if [e.get("value") for e in mode] != ["token"]:
                problems.append(f"{group}/{container['name']}: RAY_AUTH_MODE is not token")
    return problems


def _environment_problems(rayservice: dict) -> list[str]:
    problems = []
    containers = [
        (f"{group}/{c['name']}", c)
        for group, pod in pod_templates(rayservice).items()
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
    ]
    containers.append(("autoscaler", cluster_spec(rayservice).get("autoscalerOptions", {})))
    for where, container in containers:
        for entry in container.get("env", []):
            if entry["name"] in SECRETS + OPTIONAL_SECRETS or "secretKeyRef" in entry.get(
                "valueFrom", {}
            ):
                problems.append(f"{where}: secret in the environment ({entry['name']})")
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                problems.append(f"{where}: a whole Secret in the environment (envFrom)")
    env = serve_config(rayservice)["applications"][0]["args"]["env"]
    for name in SECRETS + OPTIONAL_SECRETS:
        if name in env:
            problems.append(f"serveConfigV2: {name} as a plain value")
    return problems


def _exposure_problems(objects: list[dict], rayservice: dict) -> list[str]:
    problems = []
    for service in [obj for obj in objects if obj["kind"] == "Service"]:
        for port in service["spec"]["ports"]:
            if {port["port"], port.get("targetPort")} & RAY_PORTS:
                problems.append(f"Service {service['metadata']['name']} exposes {port}")
    head = cluster_spec(rayservice)["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append("the head Service KubeRay makes is reachable from outside the cluster")
    if "serveService" in rayservice["spec"]:
        problems.append("a serveService of the RayService's own")
    # KubeRay puts every port of the head container into the head Service.
    for port in head_container(rayservice).get("ports", []):
        if port["containerPort"] == 10001 or port.get("name") == "client":
            problems.append("the Ray Client port is a port of the head container")
    if head.get("rayStartParams", {}).get("ray-client-server-port"):
        problems.append("the Ray Client server is asked for")
    return problems


def _network_policy_problems(objects: list[dict], rayservice: dict) -> list[str]:
    policies = [obj for obj in objects if obj["kind"] == "NetworkPolicy"]
    if len(policies) != 1:
        return [f"{len(policies)} NetworkPolicies, expected 1"]
    (policy,) = policies
    try:
        validate_kubernetes(policy)
    except kubernetes_validate.ValidationError as exc:
        return [f"NetworkPolicy invalid: {exc.message}"]
    spec = policy["spec"]
    selected = spec["podSelector"].get("matchLabels", {}).items()
    problems = [
        f"the NetworkPolicy does not select the {group} pods"
        for group, pod in pod_templates(rayservice).items()
        if not selected or not selected <= pod["metadata"]["labels"].items()
    ]
    if "Ingress" not in spec.get("policyTypes", []):
        problems.append("the NetworkPolicy does not restrict ingress")
    rules = [_rule_problem(rule, dict(selected)) for rule in spec.get("ingress", [])]
    return problems + [p for p in rules if p]


def _rule_problem(rule: dict, own_labels: dict[str, str]) -> str | None:
    """What one ingress rule lets in that it should not; None when it is one of the three
    allowed kinds: the API port from anywhere, anything from the release's own pods, the
    dashboard from pods picked by a selector (the operator)."""
    ports = [(p.get("protocol", "TCP"), p.get("port")) for p in rule.get("ports", [])]
    peers = rule.get("from", [])
    if ports == [("TCP", API_PORT)]:
        return None
    own = {"podSelector": {"matchLabels": own_labels}}
    if peers and all(p == own for p in peers):
        return None
    selected = all("podSelector" in p and "ipBlock" not in p for p in peers)
    if ports == [("TCP", DASHBOARD_PORT)] and peers and selected:
        return None
    return f"the NetworkPolicy lets in {ports or 'every port'} from {peers or 'anywhere'}"


def _secret_volume_problems(rayservice: dict) -> list[str]:
    problems = []
    for group, pod in pod_templates(rayservice).items():
        secret_volumes = {v["name"]: v for v in pod["spec"].get("volumes", []) if _holds_secrets(v)}
        if secret_volumes and group != "head":
            problems.append(f"{group} pods mount secrets ({', '.join(secret_volumes)})")
        for name, volume in secret_volumes.items():
            source = volume.get("secret") or volume["projected"]
            if source.get("defaultMode", 0o644) & 0o077:  # the owner's alone
                problems.append(f"{group} volume {name}: mode {source.get('defaultMode')!r}")
        for container in pod["spec"]["containers"]:
            for mount in container.get("volumeMounts", []):
                if mount["name"] in secret_volumes and mount.get("readOnly") is not True:
                    problems.append(f"{group}/{container['name']}: {mount['name']} is writable")
    return problems


def _holds_secrets(volume: dict) -> bool:
    sources = volume.get("projected", {}).get("sources", [])
    return "secret" in volume or any("secret" in source for source in sources)


def _mounted_secret_files(rayservice: dict) -> set[str]:
    """The paths of the files of the head's projected secret volume, as the API sees them."""
    pod = pod_templates(rayservice)["head"]
    mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    return {
        f"{mounts[volume['name']]}/{item['path']}"
        for volume in pod["spec"]["volumes"]
        if "projected" in volume
        for source in volume["projected"]["sources"]
        for item in source.get("secret", {}).get("items", [])
    }


# --- Kubernetes: the deployments ----------------------------------------------------------


WITH_WEBHOOKS: dict[str, Any] = {
    "authSecret": {"rotationWebhookSecretKey": "webhook"},
    "env": {"CAVE_ROTATION_WEBHOOK_URL": "https://hooks.example/rotated"},
    "trustedPool": {"enabled": True},
    "rayAuth": {"secretName": "cave-ray-token"},
    "networkPolicy": {
        "apiFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress"}}}],
        "operator": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
        },
    },
}


@pytest.fixture(scope="module")
def chart_default() -> list[dict]:
    return render()


@pytest.mark.parametrize("which", ["chart defaults", "chart with every option", "static"])
def test_every_kubernetes_deployment_is_secured(
    which: str, chart_default: list[dict], tmp_path: Path
) -> None:
    objects = {
        "chart defaults": lambda: chart_default,
        "chart with every option": lambda: render(WITH_WEBHOOKS, tmp_path),
        "static": lambda: load_yaml_all(STATIC),
    }[which]()
    assert kubernetes_problems(objects) == []


def test_the_api_reads_every_secret_from_a_mounted_file(tmp_path: Path) -> None:
    rayservice = only(render(WITH_WEBHOOKS, tmp_path), "RayService")
    env = serve_config(rayservice)["applications"][0]["args"]["env"]
    files = {name: env.get(f"{name}_FILE") for name in SECRETS + OPTIONAL_SECRETS}
    assert set(files.values()) <= _mounted_secret_files(rayservice), files
    cluster = cluster_spec(rayservice)
    assert cluster["authOptions"] == {"mode": "token", "secretName": "cave-ray-token"}


def _drop_auth_of_a_worker(objects: list[dict]) -> None:
    pod = pod_templates(only(objects, "RayService"))["gpu-inference"]
    env = pod["spec"]["containers"][0]["env"]
    env[:] = [e for e in env if e["name"] != "RAY_AUTH_MODE"]


def _secret_env_on_the_head(objects: list[dict]) -> None:
    ref = {"secretKeyRef": {"name": "cave-auth", "key": "key-pepper"}}
    head_container(only(objects, "RayService"))["env"].append(
        {"name": "CAVE_KEY_PEPPER", "valueFrom": ref}
    )


def _dashboard_in_the_api_service(objects: list[dict]) -> None:
    only(objects, "Service")["spec"]["ports"].append({"name": "dash", "port": 8265})


def _client_port_on_the_head(objects: list[dict]) -> None:
    head_container(only(objects, "RayService"))["ports"].append(
        {"name": "client", "containerPort": 10001}
    )


def _policy_open_to_all(objects: list[dict]) -> None:
    only(objects, "NetworkPolicy")["spec"]["ingress"].append({})


def _gcs_open_to_an_ip_block(objects: list[dict]) -> None:
    only(objects, "NetworkPolicy")["spec"]["ingress"].append(
        {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 6379}]}
    )


def _writable_secrets(objects: list[dict]) -> None:
    for mount in head_container(only(objects, "RayService"))["volumeMounts"]:
        mount.pop("readOnly", None)


def _no_policy(objects: list[dict]) -> None:
    objects[:] = [obj for obj in objects if obj["kind"] != "NetworkPolicy"]


BREAKAGES: dict[str, tuple[Callable[[list[dict]], None], str]] = {
    "no authOptions": (
        lambda o: cluster_spec(only(o, "RayService")).pop("authOptions"),
        "authOptions.mode is not token",
    ),
    "a worker group without token mode": (_drop_auth_of_a_worker, "gpu-inference/ray-worker"),
    "a secret in the head's environment": (_secret_env_on_the_head, "secret in the environment"),
    "the dashboard in a Service": (_dashboard_in_the_api_service, "exposes"),
    "the Ray Client port on the head": (_client_port_on_the_head, "Ray Client port"),
    "a policy rule open to all": (_policy_open_to_all, "every port"),
    "GCS open to the internet": (_gcs_open_to_an_ip_block, "ipBlock"),
    "secrets mounted writable": (_writable_secrets, "cave-secrets is writable"),
    "no NetworkPolicy": (_no_policy, "0 NetworkPolicies"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_the_checks_catch_each_way_of_breaking_the_files(
    breakage: str, chart_default: list[dict]
) -> None:
    objects = copy.deepcopy(chart_default)
    breaks, expected = BREAKAGES[breakage]
    breaks(objects)
    problems = kubernetes_problems(objects)
    assert any(expected in problem for problem in problems), problems


def test_a_secret_in_the_charts_env_values_is_refused(tmp_path: Path) -> None:
    from tests.cluster.manifests import RenderError

    with pytest.raises(RenderError, match="CAVE_KEY_PEPPER"):
        render({"env": {"CAVE_KEY_PEPPER": "c2VjcmV0"}}, tmp_path)


# --- `ray up` ---------------------------------------------------------------------------------


def _ray_start_env(command: str) -> dict[str, str]:
    """The variables the command exports before its `ray start` (or `serve deploy`)."""
    env: dict[str, str] = {}
    for word in shlex.split(command.replace(";", " ; ").replace("'", " ")):
        if re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", word):
            name, _, value = word.partition("=")
            env[name] = value
    return env


def launcher_problems(config: dict, serve: dict) -> list[str]:
    """Everything that leaves a `ray up` deployment less than secured."""
    problems = []
    starts = {
        "head": config["head_start_ray_commands"],
        "worker": config["worker_start_ray_commands"],
    }
    for node, commands in starts.items():
        for command in commands:
            if "ray start" not in command and "serve deploy" not in command:
                continue
            env = _ray_start_env(command)
            if env.get("RAY_AUTH_MODE") != "token" or not env.get("RAY_AUTH_TOKEN_PATH"):
                problems.append(f"{node}: {command[:40]!r}... without token auth")
            if set(env) & set(SECRETS + OPTIONAL_SECRETS) or re.search(r"(^|[;&] *)\. ", command):
                problems.append(f"{node}: secrets in the environment of Ray")
    head_start = " ".join(starts["head"])
    if "--dashboard-host=127.0.0.1" not in head_start:
        problems.append("the dashboard listens beyond 127.0.0.1")
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        if (rule.get("FromPort"), rule.get("ToPort")) != (API_PORT, API_PORT):
            problems.append(f"the security group opens {rule.get('FromPort')}-{rule.get('ToPort')}")
    head_setup = " ".join(config["head_setup_commands"])
    if "-m 0400 {} /etc/cave/secrets/" not in head_setup or "-delete" not in head_setup:
        problems.append("the head does not install the secrets 0400 and empty their mount")
    worker_setups = [config["worker_setup_commands"]] + [
        t["worker_setup_commands"]
        for t in config["available_node_types"].values()
        if "worker_setup_commands" in t
    ]
    for setup in [config["head_setup_commands"], *worker_setups]:
        if not any("-m 0400 /home/ubuntu/ray-auth-token" in c for c in setup):
            problems.append("a node type without the Ray token installed 0400")
    for setup in worker_setups:
        if not any("rm -rf" in c and "/home/ubuntu/cave-secrets" in c for c in setup):
            problems.append("a worker type keeps the secrets' mount")
    for local in config["file_mounts"].values():
        if local != "." and local not in config["rsync_exclude"]:
            problems.append(f"{local} travels to every node inside the repository's mount")
    env = serve["applications"][0]["args"]["env"]
    for name in SECRETS:
        if not env.get(f"{name}_FILE", "").startswith("/etc/cave/secrets/") or name in env:
            problems.append(f"serve.yaml does not read {name} from /etc/cave/secrets")
    return problems


def test_the_launcher_deployment_is_secured() -> None:
    assert launcher_problems(load_yaml(LAUNCHER), load_yaml(DEPLOY / "serve.yaml")) == []


def _edit(path: tuple[str, ...], change: Callable[[Any], Any]) -> Callable[[dict], None]:
    def apply(config: dict) -> None:
        parent = config
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = change(parent[path[-1]])

    return apply


LAUNCHER_BREAKAGES: dict[str, tuple[Callable[[dict], None], str]] = {
    "workers without the token": (
        _edit(
            ("worker_start_ray_commands",),
            lambda cs: [c.replace("RAY_AUTH_MODE=token", "") for c in cs],
        ),
        "worker:",
    ),
    "the head sourcing an env file": (
        _edit(("head_start_ray_commands",), lambda cs: [cs[0], ". /etc/cave.env; " + cs[1]]),
        "secrets in the environment",
    ),
    "the dashboard on every interface": (
        _edit(
            ("head_start_ray_commands",),
            lambda cs: [c.replace("127.0.0.1", "0.0.0.0") for c in cs],
        ),
        "beyond 127.0.0.1",
    ),
    "the Jobs API in the security group": (
        _edit(
            ("provider", "security_group", "IpPermissions"),
            lambda rules: [*rules, {"FromPort": 8265, "ToPort": 8265}],
        ),
        "opens 8265-8265",
    ),
    "a GPU node without the token": (
        _edit(
            ("available_node_types", "gpu_inference", "worker_setup_commands"),
            lambda cs: cs[-1:],
        ),
        "without the Ray token",
    ),
    "secrets copied with the repository": (
        _edit(("rsync_exclude",), lambda ex: [e for e in ex if e != "cluster/deploy/secrets"]),
        "cluster/deploy/secrets travels",
    ),
}


@pytest.mark.parametrize("breakage", LAUNCHER_BREAKAGES)
def test_the_launcher_checks_catch_each_way_of_breaking_it(breakage: str) -> None:
    config = copy.deepcopy(load_yaml(LAUNCHER))
    breaks, expected = LAUNCHER_BREAKAGES[breakage]
    breaks(config)
    problems = launcher_problems(config, load_yaml(DEPLOY / "serve.yaml"))
    assert any(expected in problem for problem in problems), problems


def test_the_launcher_yaml_keeps_one_token_path_for_every_node() -> None:
    config = load_yaml(LAUNCHER)
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    paths = {_ray_start_env(c).get("RAY_AUTH_TOKEN_PATH") for c in commands if "ray st" in c}
    setups = config["head_setup_commands"] + config["worker_setup_commands"]
    installed = re.findall(r"-m 0400 /home/ubuntu/ray-auth-token (\S+)", " ".join(setups))
    assert paths - {None} == {"/etc/cave/ray-auth-token"} == set(installed)
