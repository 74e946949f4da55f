"""Parsing helpers for environment variables shared by every settings loader."""

from __future__ import annotations


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
