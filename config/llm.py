"""Model-access settings (`LlmSettings`): who signs model-access tokens, for whom, for how long, and
the default rate limits of a key; read from the CAVE_LLM_* variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Self

from pydantic import BaseModel, field_validator, model_validator

from cave.settings_env import env_field, load_section

DEFAULT_TTL_S = 3600
DEFAULT_MAX_TTL_S = 30 * 86400
DEFAULT_LEEWAY_S = 30
MAX_LEEWAY_S = 600  # past this, "expired" would stop meaning anything
DEFAULT_REVOCATION_MAX_AGE_S = 5.0  # ten refresh intervals (0.5 s) missed in a row
MAX_REVOCATION_MAX_AGE_S = 300.0  # longer, and a revoked key could live minutes on a replica
# A key approved without limits of its own gets these: a leaked or looping key costs at most
# this much a minute. OpenAI's first tier is of this order (500 rpm, 200k tpm).
DEFAULT_RPM = 600
DEFAULT_TPM = 200_000
MAX_PER_MINUTE = 1_000_000_000  # fits the database's 32-bit integer columns


class LlmSettings(BaseModel, frozen=True, extra="forbid"):
    """Who signs model-access tokens, for whom, for how long; built once at the entry point."""

    issuer: str = env_field(
        "CAVE_LLM_ISSUER",
        "cave",
        accepts="a name without spaces",
        description="The tokens' `iss`; give each cluster of a peer group its own",
    )
    audience: str = env_field(
        "CAVE_LLM_AUDIENCE",
        "cave-llm",
        accepts="a name without spaces",
        description="The tokens' `aud`; the same across peers that trust each other",
    )
    token_ttl_s: int = env_field(
        "CAVE_LLM_TOKEN_TTL_S",
        DEFAULT_TTL_S,
        ge=1,
        blank_is_unset=True,
        description="Lifetime of a token whose request names none (seconds)",
    )
    token_max_ttl_s: int = env_field(
        "CAVE_LLM_TOKEN_MAX_TTL_S",
        DEFAULT_MAX_TTL_S,
        ge=1,
        blank_is_unset=True,
        description=(
            "Longest lifetime a token may have (seconds; default 30 days); also how long a "
            "retired signing key verifies"
        ),
    )
    leeway_s: int = env_field(
        "CAVE_LLM_LEEWAY_S",
        DEFAULT_LEEWAY_S,
        ge=0,
        le=MAX_LEEWAY_S,
        blank_is_unset=True,
        description="Clock skew tolerated on a token's `exp`, `nbf` and `iat` (seconds)",
    )
    revocation_max_age_s: float = env_field(
        "CAVE_LLM_REVOCATION_MAX_AGE_S",
        DEFAULT_REVOCATION_MAX_AGE_S,
        ge=1,
        le=MAX_REVOCATION_MAX_AGE_S,
        blank_is_unset=True,
        description=(
            "Seconds a replica trusts its view of revoked model-access keys; older (the "
            "database unreadable), it refuses every model-access key with 503 "
            "`revocations_stale` and `Retry-After`"
        ),
    )
    # All replicas together; 0 must be asked for: no limit.
    rpm: int = env_field(
        "CAVE_LLM_RPM",
        DEFAULT_RPM,
        ge=0,
        le=MAX_PER_MINUTE,
        blank_is_unset=True,
        description=(
            "Chat requests per minute of a model-access key approved without limits of its own, "
            "across replicas; 0: no limit"
        ),
    )
    tpm: int = env_field(
        "CAVE_LLM_TPM",
        DEFAULT_TPM,
        ge=0,
        le=MAX_PER_MINUTE,
        blank_is_unset=True,
        description=(
            "Tokens (prompt + completion) per minute of such a key, across replicas; 0: no limit"
        ),
    )
    peers_file: str = env_field(
        "CAVE_PEERS_FILE",
        "",
        accepts="a path, or empty",
        shown_default="empty (no peers)",
        description=(
            "The peer clusters' TOML file, whose tokens this cluster accepts (model-access.md)"
        ),
    )

    @field_validator("issuer", "audience")
    @classmethod
    def _name(cls, value: str) -> str:
        name = value.strip()
        if not name or any(c.isspace() or not c.isprintable() for c in name):
            raise ValueError("expected a non-empty name without spaces")
        return name

    @field_validator("peers_file")
    @classmethod
    def _stripped(cls, value: str) -> str:
        return value.strip()

    @model_validator(mode="after")
    def _ttl_within_maximum(self) -> Self:
        if self.token_ttl_s > self.token_max_ttl_s:
            raise ValueError(
                f"CAVE_LLM_TOKEN_TTL_S={self.token_ttl_s} is longer than "
                f"CAVE_LLM_TOKEN_MAX_TTL_S={self.token_max_ttl_s}"
            )
        return self


def load_llm_settings(env: Mapping[str, str] | None = None) -> LlmSettings:
    """The settings from `env` (default: the process environment); ConfigError naming the
    variable when one is malformed."""
    return load_section(LlmSettings, os.environ if env is None else env)
