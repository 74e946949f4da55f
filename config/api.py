"""Settings of the API replicas (request limits, upkeep, tracing, exec records, models file), of
`cave up` (where the API listens, the ingress) and the client's variables, declared field by field
(cave/settings_env.py) so that the one tree (config/tree.py) lists them."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, SecretStr, field_validator

from cave.settings_env import env_field

log = logging.getLogger("cave.api")

MIB = 1024 * 1024
MAX_FILE_BYTES = 64 * MIB  # one PUT of a file: what one call to a sandbox carries
INLINE_OUTPUT_BYTES = 4 * MIB  # per stream of a non-streamed exec; more: the stream
DEFAULT_MODELS_FILE = Path(__file__).resolve().parent / "models.toml"
DEFAULT_SAMPLING_RATE = 1.0


class ApiLimits(BaseModel, frozen=True, extra="forbid"):
    """Bytes a request body may hold, per kind of route, checked before routing and
    authentication (413; see api.md, Limits), and what a non-streamed exec returns."""

    json_bytes: int = env_field(
        "CAVE_API_MAX_BODY_BYTES", 1 * MIB, gt=0, description="Most bytes of a JSON request body"
    )
    file_bytes: int = env_field(
        "CAVE_API_MAX_FILE_BYTES",
        MAX_FILE_BYTES,
        gt=0,
        le=MAX_FILE_BYTES,
        description="Most bytes of one file upload (`PUT .../files/{path}`); the default is also "
        "its ceiling",
    )
    chat_bytes: int = env_field(
        "CAVE_API_MAX_CHAT_BODY_BYTES",
        8 * MIB,
        gt=0,
        description="Most bytes of a chat request body (long prompts, images)",
    )
    mcp_bytes: int = env_field(
        "CAVE_API_MAX_MCP_BODY_BYTES",
        4 * MIB,
        gt=0,
        description="Most bytes of an MCP message (the MCP SDK's own default)",
    )
    exec_output_bytes: int = env_field(
        "CAVE_API_EXEC_OUTPUT_BYTES",
        INLINE_OUTPUT_BYTES,
        gt=0,
        description=(
            "Most bytes of each of stdout and stderr a non-streamed exec returns (`truncated` "
            "beyond); the stream returns up to the sandbox's `output_bytes`"
        ),
    )


class UpkeepSettings(BaseModel, frozen=True, extra="forbid"):
    """The upkeep task of each API replica."""

    interval_s: float = env_field(
        "CAVE_UPKEEP_INTERVAL_S",
        1.0,
        ge=0.05,
        le=60,
        description=(
            "How often a replica expires sandboxes (ttl, idle), flushes batched activity and "
            "delivers webhooks (seconds); reconciliation with the actors runs every fifth tick"
        ),
    )


class ExecRecordSettings(BaseModel, frozen=True, extra="forbid"):
    """How the audit records of execs and file calls are written."""

    mode: Literal["async", "sync"] = env_field(
        "CAVE_EXEC_RECORDS",
        "async",
        description=(
            "`async`: exec and file audit records are written in batches after the response; "
            "`sync`: the response waits for its batch to commit"
        ),
    )


class TracingSettings(BaseModel, frozen=True, extra="forbid"):
    """OpenTelemetry tracing of the API (observability.md); the exporter is configured by the
    standard `OTEL_EXPORTER_OTLP_*` variables."""

    sampling_rate: float = env_field(
        "CAVE_OTEL_SAMPLING_RATE",
        DEFAULT_SAMPLING_RATE,
        text=True,
        blank_is_unset=True,
        accepts="a fraction from 0 to 1",
        description=(
            "Share of traces recorded; unlike the other settings a bad value does not stop "
            "start-up: out of [0, 1] it is clamped, not a number it is the default (a warning "
            "either way)"
        ),
    )

    @field_validator("sampling_rate", mode="before")
    @classmethod
    def _fraction(cls, value: object) -> float:
        """Tracing is never worth refusing to start for: clamp or fall back, with a warning."""
        value = value.strip() if isinstance(value, str) else value
        try:
            rate = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            rate = math.nan
        if math.isnan(rate):
            log.warning(
                "CAVE_OTEL_SAMPLING_RATE=%r is not a number; using %s", value, DEFAULT_SAMPLING_RATE
            )
            return DEFAULT_SAMPLING_RATE
        clamped = min(max(rate, 0.0), 1.0)
        if clamped != rate:
            log.warning("CAVE_OTEL_SAMPLING_RATE=%r is outside [0, 1]; using %s", value, clamped)
        return clamped


class ModelsSettings(BaseModel, frozen=True, extra="forbid"):
    """Which models the cluster serves (inference/registry.py)."""

    models_file: Path = env_field(
        "CAVE_MODELS_FILE",
        DEFAULT_MODELS_FILE,
        blank_is_unset=True,
        shown_default="`config/models.toml` (shipped, no models)",
        description="The models this cluster serves, one `[[models]]` table each",
    )


class ClusterSettings(BaseModel, frozen=True, extra="forbid"):
    """What `cave up` reads: where the API listens, how HTTP reaches it, where it keeps state."""

    api_host: str = env_field(
        "CAVE_API_HOST",
        "127.0.0.1",
        accepts="an address",
        description="Where `cave up` serves the API",
    )
    api_port: int | None = env_field(
        "CAVE_API_PORT",
        None,
        gt=0,
        lt=65536,
        accepts="a TCP port number (1 to 65535)",
        shown_default="`8000` (a free port when 8000 is taken)",
        description="The API's TCP port under `cave up`",
    )
    ingress: Literal["haproxy", "serve"] = env_field(
        "CAVE_INGRESS",
        "haproxy",
        description=(
            "`haproxy`: Serve's HAProxy ingress with tuned settings (cluster/ingress.py, "
            "ingress.md); `serve`: Serve's proxy actor"
        ),
    )
    home: Path | None = env_field(
        "CAVE_HOME",
        None,
        blank_is_unset=True,
        shown_default="`~/.cave`",
        description=(
            "Where the CLI keeps `cave up`'s cluster state and the API's address and admin key "
            "(`api.json`, 0600); not passed to the API"
        ),
    )


class ClientSettings(BaseModel, frozen=True, extra="forbid"):
    """Never read by the server; an argument (`base_url=`, `--url`) wins over the variable."""

    api_url: str | None = env_field(
        "CAVE_API_URL",
        None,
        accepts="a URL",
        shown_default="unset (the CLI: `cave up`'s `api.json`)",
        description="The API the client talks to",
    )
    api_key: SecretStr | None = env_field(
        "CAVE_API_KEY",
        None,
        accepts="an API key",
        shown_default="unset (the CLI: `cave up`'s admin key)",
        description="The key the client sends (`Authorization: Bearer`)",
    )
