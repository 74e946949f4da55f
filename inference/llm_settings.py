"""Model-access token settings (`LlmSettings`), read from the CAVE_LLM_* variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from cave.errors import ConfigError

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


@dataclass(frozen=True, slots=True)
class LlmSettings:
    """Who signs model-access tokens, for whom, for how long; built once at the entry point."""

    issuer: str = "cave"  # CAVE_LLM_ISSUER: the tokens' `iss`
    audience: str = "cave-llm"  # CAVE_LLM_AUDIENCE: the tokens' `aud`
    token_ttl_s: int = DEFAULT_TTL_S  # CAVE_LLM_TOKEN_TTL_S: lifetime when a request names none
    token_max_ttl_s: int = DEFAULT_MAX_TTL_S  # CAVE_LLM_TOKEN_MAX_TTL_S: longest lifetime allowed
    leeway_s: int = DEFAULT_LEEWAY_S  # CAVE_LLM_LEEWAY_S: clock skew tolerated on exp/nbf/iat
    # CAVE_LLM_REVOCATION_MAX_AGE_S: a replica whose revocation view is older refuses keys (503)
    revocation_max_age_s: float = DEFAULT_REVOCATION_MAX_AGE_S
    # CAVE_LLM_RPM / CAVE_LLM_TPM: requests and tokens (prompt + completion) per minute for a key
    # approved without limits of its own, all replicas together; 0 must be asked for: no limit.
    rpm: int = DEFAULT_RPM
    tpm: int = DEFAULT_TPM
    peers_file: str = ""  # CAVE_PEERS_FILE: the peer clusters' TOML file ("": no peers)


def load_llm_settings(env: Mapping[str, str] | None = None) -> LlmSettings:
    """The settings from `env` (default: the process environment); ConfigError naming the
    variable when one is malformed."""
    env = os.environ if env is None else env
    max_ttl_s = _seconds(env, "CAVE_LLM_TOKEN_MAX_TTL_S", DEFAULT_MAX_TTL_S, minimum=1)
    ttl_s = _seconds(env, "CAVE_LLM_TOKEN_TTL_S", DEFAULT_TTL_S, minimum=1)
    if ttl_s > max_ttl_s:
        raise ConfigError(
            f"CAVE_LLM_TOKEN_TTL_S={ttl_s} is longer than CAVE_LLM_TOKEN_MAX_TTL_S={max_ttl_s}"
        )
    return LlmSettings(
        issuer=_name(env, "CAVE_LLM_ISSUER", "cave"),
        audience=_name(env, "CAVE_LLM_AUDIENCE", "cave-llm"),
        token_ttl_s=ttl_s,
        token_max_ttl_s=max_ttl_s,
        leeway_s=_seconds(env, "CAVE_LLM_LEEWAY_S", DEFAULT_LEEWAY_S, 0, MAX_LEEWAY_S),
        revocation_max_age_s=_max_age(env, "CAVE_LLM_REVOCATION_MAX_AGE_S"),
        rpm=_per_minute(env, "CAVE_LLM_RPM", DEFAULT_RPM),
        tpm=_per_minute(env, "CAVE_LLM_TPM", DEFAULT_TPM),
        peers_file=env.get("CAVE_PEERS_FILE", "").strip(),
    )


def _name(env: Mapping[str, str], variable: str, default: str) -> str:
    raw = env.get(variable)
    if raw is None:
        return default
    value = raw.strip()
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(f"{variable}={raw!r}: expected a non-empty name without spaces")
    return value


def _seconds(
    env: Mapping[str, str], variable: str, default: int, minimum: int, maximum: int | None = None
) -> int:
    raw = env.get(variable)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{variable}={raw!r}: expected whole seconds") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{variable}={raw!r}: expected whole seconds {bound}")
    return value


def _per_minute(env: Mapping[str, str], variable: str, default: int) -> int:
    raw = env.get(variable)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{variable}={raw!r}: expected a whole number per minute") from None
    if not 0 <= value <= MAX_PER_MINUTE:
        raise ConfigError(
            f"{variable}={raw!r}: expected a whole number from 0 (no limit) to {MAX_PER_MINUTE}"
        )
    return value


def _max_age(env: Mapping[str, str], variable: str) -> float:
    raw = env.get(variable)
    if raw is None or not raw.strip():
        return DEFAULT_REVOCATION_MAX_AGE_S
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{variable}={raw!r}: expected seconds") from None
    if not 1.0 <= value <= MAX_REVOCATION_MAX_AGE_S:  # NaN fails too
        raise ConfigError(
            f"{variable}={raw!r}: expected seconds between 1 and {MAX_REVOCATION_MAX_AGE_S:g}"
        )
    return value
