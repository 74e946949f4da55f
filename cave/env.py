"""Parsing helpers for environment variables shared by every settings loader."""

from __future__ import annotations

from collections.abc import Mapping

from cave.errors import ConfigError


def parse_bool(raw: str) -> bool:
    """true/false, 1/0, yes/no in any case; ValueError (the caller names the variable) otherwise."""
    word = raw.strip().lower()
    if word in ("true", "1", "yes"):
        return True
    if word in ("false", "0", "no"):
        return False
    raise ValueError("expected true/false, 1/0 or yes/no")


def parse_choice(raw: str, choices: tuple[str, ...]) -> str:
    """One of `choices`, in any case; ValueError naming them otherwise."""
    word = raw.strip().lower()
    if word not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}")
    return word


def env_choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    """The variable `name` as one of `choices` (`default` when unset); ConfigError naming it."""
    raw = env.get(name, default)
    try:
        return parse_choice(raw, choices)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r}: {exc}") from None
