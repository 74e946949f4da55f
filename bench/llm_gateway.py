"""Chat gateway overhead: time to first token over HTTP against the engine's Serve handle directly.

One local cluster with the default ingress (HAProxy, tuned), the CAVE app serving the tiny CPU
model of the tests, and a model-access key obtained through the API (request, admin approval).
Then, interleaved, N times each (CAVE_BENCH_N, default 200), the same prompt, max_tokens=8,
temperature 0, fixed seed:
  - time to the first delta with text from `ModelEngine:tiny`'s handle, called from this driver;
  - time to the first SSE chunk with content of a streamed POST /v1/chat/completions (raw httpx,
    keep-alive; the openai client too, for information), with a key granted no rate limit and
    with a rate-limited key (every key is limited by default; its limits here are never reached,
    so the row shows what counting the key's requests and tokens costs);
  - the whole answer, not streamed, over HTTP and through the handle (for information).
The figure of issue 5: the HTTP TTFT minus the handle TTFT, p50 at most 3 ms. Token verification
with the revocation check is measured on its own: `python -m bench.token_verify`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import openai

from bench.common import percentiles, report

N = int(os.environ.get("CAVE_BENCH_N", "200"))
WARMUP = 10
MODEL, NAMESPACE = "tiny", "bench-llm"
TARGET_OVERHEAD_MS = 3.0
MESSAGES = [{"role": "user", "content": "Tell me a story about a sandbox."}]
PARAMS: dict[str, Any] = {"max_tokens": 8, "temperature": 0.0, "seed": 7}
READY_TIMEOUT_S = 180.0

HANDLE_TTFT = "TTFT, engine handle (driver)"
HTTPX_TTFT = "TTFT, HTTP streamed (httpx)"
LIMITED_TTFT = "TTFT, HTTP streamed, rate-limited key"
OPENAI_TTFT = "TTFT, HTTP streamed (openai client)"
HANDLE_TOTAL = "whole answer, engine handle (driver)"
HTTP_TOTAL = "whole answer, HTTP not streamed (httpx)"
HTTP_FLOOR = "GET /healthz (HTTP floor, no model)"


class Paths:
    """Where one run keeps its database, secrets, model and HAProxy files (removed at the end)."""

    def __init__(self) -> None:
        base = Path(os.environ.get("CAVE_BENCH_STATE_DIR", "/run/cave-bench"))
        self.root = base / f"llm-gateway-{os.getpid()}"
        # Short: HAProxy's unix sockets go under it, and a socket path has at most 107 bytes.
        self.haproxy = Path(f"/tmp/cave-haproxy-bench-{os.getpid()}")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.haproxy, ignore_errors=True)


def app_env(root: Path) -> dict[str, str]:
    """The API's settings, as in tests/api/conftest.py, with no warm sandboxes (none are used)."""
    return {
        "BKG_DB_PATH": str(root / "cave.db"),
        "CAVE_SECRETS_DIR": str(root / "secrets"),
        "CAVE_STATE_DIR": str(root / "state"),
        "CAVE_POOL_SIZE": "0",
        "CAVE_AUDIT_LOG_ENABLED": "true",
        "CAVE_AUDIT_LOG_PATH": str(root / "audit" / "audit.jsonl"),
        "CAVE_AUDIT_LOG_HMAC_KEY": base64.b64encode(secrets.token_bytes(32)).decode().rstrip("="),
    }


def deploy(paths: Paths) -> tuple[str, str]:
    """Start Ray and the CAVE app with the tiny model; (base URL, admin key)."""
    from cluster.ingress import ingress_env, listen_ports

    # Serve reads its ingress settings at import in every Ray process: set them before ray.init.
    os.environ.update(ingress_env(os.environ, paths.haproxy))
    import ray
    from ray import serve

    from bench.api_ingress import _wait_direct_routing
    from bench.common import start_ray
    from cave.auth.bootstrap import create_admin_key
    from deployments.http.app import APP_NAME, build_app
    from tests.inference.tiny_model import build_tiny_model

    start_ray()
    env = app_env(paths.root)
    admin_key = asyncio.run(create_admin_key({**os.environ, **env}))
    source = str(build_tiny_model(paths.root / "tiny"))
    port = listen_ports(1)[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    models = [{"model_id": MODEL, "engine": "cpu", "source": source}]
    serve.run(build_app({"env": env, "models": models}), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(f"{url}/readyz")
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        # Until HAProxy marks the replica UP it forwards to Serve's slower fallback proxy.
        _wait_direct_routing(ray.get_runtime_context().get_node_id())
    return url, admin_key


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            if httpx.get(url, timeout=5.0).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready within {READY_TIMEOUT_S} s")
        time.sleep(0.2)


def model_key(client: httpx.Client, admin_key: str, limit: int) -> str:
    """A namespace key with llm:request asks for the model; the admin approves with `limit`
    requests and tokens per minute (0: no limit): the JWT."""
    admin = {"authorization": f"Bearer {admin_key}"}
    made = client.post(
        "/api/v1/auth/keys",
        json={"kind": "namespace", "namespace": NAMESPACE, "scopes": ["llm:request"]},
        headers=admin,
    )
    made.raise_for_status()
    asked = client.post(
        "/api/v1/llm/requests",
        json={"model_id": MODEL, "cave_namespace": NAMESPACE},
        headers={"authorization": f"Bearer {made.json()['key']}"},
    )
    asked.raise_for_status()
    approved = client.post(
        f"/api/v1/admin/llm/requests/{asked.json()['id']}/approve",
        json={"rpm": limit, "tpm": limit},
        headers=admin,
    )
    approved.raise_for_status()
    return str(approved.json()["model_access_key"])


Probe = Callable[[], tuple[float, str]]  # one request: (seconds measured, the answer's text)


def probes(
    handle: Any, http: httpx.Client, limited: httpx.Client, oai: openai.OpenAI
) -> dict[str, Probe]:
    request = {"model": MODEL, "messages": MESSAGES, "top_p": 1.0, "stop": [], **PARAMS}
    body = {"model": MODEL, "messages": MESSAGES, **PARAMS}

    def handle_stream() -> tuple[float, float, str]:
        start, first, parts = time.perf_counter(), -1.0, list[str]()
        for delta in handle.options(stream=True).stream.remote(request):
            if delta.get("text") and first < 0:
                first = time.perf_counter() - start
            parts.append(str(delta.get("text") or ""))
        return first, time.perf_counter() - start, "".join(parts)

    def handle_ttft() -> tuple[float, str]:
        first, _, text = handle_stream()
        return first, text

    def handle_total() -> tuple[float, str]:
        _, total, text = handle_stream()
        return total, text

    def httpx_ttft(http: httpx.Client = http) -> tuple[float, str]:
        start, first, parts = time.perf_counter(), -1.0, list[str]()
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:])["choices"]
                content = choices[0]["delta"].get("content") if choices else None
                if content and first < 0:
                    first = time.perf_counter() - start
                parts.append(content or "")
        return first, "".join(parts)

    def openai_ttft() -> tuple[float, str]:
        start, first, parts = time.perf_counter(), -1.0, list[str]()
        chunks = oai.chat.completions.create(stream=True, **body)  # type: ignore[call-overload]
        for chunk in chunks:
            content = chunk.choices[0].delta.content if chunk.choices else None
            if content and first < 0:
                first = time.perf_counter() - start
            parts.append(content or "")
        return first, "".join(parts)

    def http_total() -> tuple[float, str]:
        start = time.perf_counter()
        resp = http.post("/v1/chat/completions", json=body)
        resp.raise_for_status()
        return time.perf_counter() - start, str(resp.json()["choices"][0]["message"]["content"])

    def http_floor() -> tuple[float, str]:
        start = time.perf_counter()
        http.get("/healthz").raise_for_status()
        return time.perf_counter() - start, ""

    return {
        HANDLE_TTFT: handle_ttft,
        HTTPX_TTFT: httpx_ttft,
        LIMITED_TTFT: lambda: httpx_ttft(limited),
        OPENAI_TTFT: openai_ttft,
        HANDLE_TOTAL: handle_total,
        HTTP_TOTAL: http_total,
        HTTP_FLOOR: http_floor,
    }


def measure(runs: dict[str, Probe], n: int) -> dict[str, list[float]]:
    """Every probe once per round, the order rotated each round so none always goes first.
    Every answer must be the same text (greedy decoding), and not empty: a TTFT needs a token."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    expected = runs[HANDLE_TOTAL]()[1]
    if not expected:
        raise RuntimeError(f"the tiny model answers {MESSAGES} with no text: pick another prompt")
    for i in range(WARMUP + n):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, text = runs[name]()
            if text != expected and name != HTTP_FLOOR:
                raise RuntimeError(f"{name} answered {text!r}, the handle {expected!r}")
            if i >= WARMUP:
                samples[name].append(seconds)
    return samples


def overhead_lines(samples: dict[str, list[float]]) -> Iterable[str]:
    handle = samples[HANDLE_TTFT]
    for name in (HTTPX_TTFT, LIMITED_TTFT, OPENAI_TTFT):
        p50 = percentiles(samples[name])["p50_ms"] - percentiles(handle)["p50_ms"]
        paired = statistics.median(b - a for a, b in zip(handle, samples[name], strict=True))
        verdict = "met" if p50 <= TARGET_OVERHEAD_MS else "NOT met"
        yield (
            f"overhead {name[6:]:32s} p50(b) - p50(a) {p50:6.2f} ms, median of paired"
            f" differences {paired * 1000:6.2f} ms  (target <= {TARGET_OVERHEAD_MS} ms: {verdict})"
        )
    total = (
        percentiles(samples[HTTP_TOTAL])["p50_ms"] - percentiles(samples[HANDLE_TOTAL])["p50_ms"]
    )
    yield f"overhead whole answer, HTTP - handle           p50(b) - p50(a) {total:6.2f} ms"


def main() -> None:
    from bench.common import stop_ray

    paths, load = Paths(), os.getloadavg()
    try:
        url, admin_key = deploy(paths)
        samples = run(url, admin_key)
    finally:
        teardown(paths, stop_ray)
    print(
        f"({N} of each, interleaved, after {WARMUP} warm-up rounds; {MESSAGES[0]['content']!r},"
        f" max_tokens={PARAMS['max_tokens']}, temperature 0; load average"
        f" {load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end)"
    )
    rows = {name: percentiles(s) for name, s in samples.items()}
    report({k: rows[k] for k in (HANDLE_TTFT, HTTPX_TTFT, LIMITED_TTFT, OPENAI_TTFT)}, HANDLE_TTFT)
    report({k: rows[k] for k in (HANDLE_TOTAL, HTTP_TOTAL)}, HANDLE_TOTAL)
    report({HTTP_FLOOR: rows[HTTP_FLOOR]})
    for line in overhead_lines(samples):
        print(line)
    print("token verification with the revocation check: python -m bench.token_verify")


def run(url: str, admin_key: str) -> dict[str, list[float]]:
    from ray import serve

    from config.llm import MAX_PER_MINUTE
    from deployments.http.app import APP_NAME
    from deployments.llm.engine import engine_deployment_name

    with httpx.Client(base_url=url, timeout=120.0) as setup:
        token = model_key(setup, admin_key, 0)
        limited_token = model_key(setup, admin_key, MAX_PER_MINUTE)
    headers = {"authorization": f"Bearer {token}", "x-cave-namespace": NAMESPACE}
    limited_headers = {**headers, "authorization": f"Bearer {limited_token}"}
    handle = serve.get_deployment_handle(engine_deployment_name(MODEL), app_name=APP_NAME)
    oai = openai.OpenAI(
        base_url=f"{url}/v1",
        api_key=token,
        default_headers={"X-Cave-Namespace": NAMESPACE},
        max_retries=0,
        timeout=120.0,
    )
    with (
        httpx.Client(base_url=url, headers=headers, timeout=120.0) as http,
        httpx.Client(base_url=url, headers=limited_headers, timeout=120.0) as limited,
        oai,
    ):
        return measure(probes(handle, http, limited, oai), N)


def teardown(paths: Paths, stop_ray: Callable[[], None]) -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        stop_ray()  # the pool's spares, then Ray
    paths.remove()


if __name__ == "__main__":
    main()
