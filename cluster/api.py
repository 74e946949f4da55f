"""The API on a running cluster for `cave up`: deploy the Serve app, bootstrap an admin key,
and remember where it is (CAVE_HOME/api.json, readable by its owner only)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import serve

from cave.auth.bootstrap import create_admin_key
from cave.errors import ConfigError
from cave.settings_env import load_section
from cluster.ingress import listen_ports
from config.api import ClusterSettings
from deployments.http.app import APP_NAME, build_app

API_FILE = "api.json"
DEFAULT_PORT = 8000
_PASSED_PREFIXES = ("CAVE_", "BKG_", "OTEL_")
SERVE_CONFIG = Path(__file__).resolve().parents[1] / "config" / "serve.yaml"


@dataclass(frozen=True)
class ApiInfo:
    url: str
    admin_key: str


def api_env(env: Mapping[str, str], cwd: Path) -> dict[str, str]:
    """The settings the replicas get: CAVE_*/BKG_* of this shell, with every relative path made
    absolute (replicas run in Ray's working directories, not this one)."""
    passed = {k: v for k, v in env.items() if k.startswith(_PASSED_PREFIXES)}
    passed.pop("CAVE_HOME", None)
    if not passed.get("BKG_DB_DSN") and not passed.get("BKG_DB_DSN_FILE"):
        passed["BKG_DB_PATH"] = str((cwd / passed.get("BKG_DB_PATH", "var/cave.db")).absolute())
    for name in [k for k in passed if k.endswith("_FILE") and passed[k]]:  # secrets, models.toml
        passed[name] = str(cwd / passed[name])
    passed["CAVE_SECRETS_DIR"] = str(cwd / passed.get("CAVE_SECRETS_DIR", "var/secrets"))
    if "CAVE_AUDIT_LOG_PATH" in passed:
        passed["CAVE_AUDIT_LOG_PATH"] = str(cwd / passed["CAVE_AUDIT_LOG_PATH"])
    return passed


def api_autoscaling(config: Path = SERVE_CONFIG) -> dict[str, Any]:
    """The ApiIngress autoscaling_config of config/serve.yaml, so that `cave up` and `serve
    deploy config/serve.yaml` scale the API alike."""
    try:
        document = yaml.safe_load(config.read_text())
        (app,) = document["applications"]
        for deployment in app.get("deployments") or []:
            if deployment.get("name") == "ApiIngress":
                return dict(deployment.get("autoscaling_config") or {})
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{config}: cannot read the API's autoscaling_config: {exc}") from None
    return {}


def api_port(env: Mapping[str, str]) -> int:
    """CAVE_API_PORT (config.api.ClusterSettings), else 8000 when free, else a free port."""
    port = load_section(ClusterSettings, env).api_port
    if port is None:
        return DEFAULT_PORT if _port_free(DEFAULT_PORT) else listen_ports(1)[0]
    return port


def deploy_api(home: Path, env: Mapping[str, str], cwd: Path) -> ApiInfo:
    """Deploy (or update) the API on the connected cluster; returns its URL and an admin key.

    The key is made once per deployment and kept in CAVE_HOME/api.json; a later `cave up`
    prints the same one while the API keeps running."""
    app = build_app({"env": api_env(env, cwd), "autoscaling": api_autoscaling()})
    known = read_api_info(home)
    if known is not None and _serving(known.url):
        serve.run(app, name=APP_NAME, route_prefix="/")
        return known
    port = api_port(env)
    host = load_section(ClusterSettings, env).api_host
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    admin_key = asyncio.run(create_admin_key({**env, **api_env(env, cwd)}))
    info = ApiInfo(f"http://{host}:{port}", admin_key)
    _write_api_info(home, info)
    return info


def read_api_info(home: Path) -> ApiInfo | None:
    try:
        raw = json.loads((home / API_FILE).read_text())
        return ApiInfo(str(raw["url"]), str(raw["admin_key"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def forget_api(home: Path) -> None:
    (home / API_FILE).unlink(missing_ok=True)


def _write_api_info(home: Path, info: ApiInfo) -> None:
    path = home / API_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(asdict(info), indent=2) + "\n")


def _serving(url: str) -> bool:
    host, _, port = url.removeprefix("http://").partition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
