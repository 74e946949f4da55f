"""Parsing helpers for environment variables: words, choices and secrets that may come from files
(NAME_FILE); the loader of declared settings (cave/settings_env.py) is built on them."""

from __future__ import annotations

from collections.abc import Mapping

from cave.errors import ConfigError

# A secret is a key or a DSN: a file larger than this is the wrong file (or /dev/zero).
MAX_SECRET_FILE_BYTES = 64 * 1024


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


def env_secret(env: Mapping[str, str], name: str) -> str | None:
    """The secret `name`, from the variable itself or from the file that `name`_FILE names (a
    mounted Kubernetes Secret, so that the value is in no process environment); None when
    neither is set. Surrounding whitespace of a file (its trailing newline) is dropped. Both
    set, or a file that cannot be read, is a ConfigError naming the variable, never the value."""
    raw = env.get(name, "")
    file_variable = f"{name}_FILE"
    path = env.get(file_variable, "").strip()
    if not path:
        return raw if raw.strip() else None
    if raw.strip():
        raise ConfigError(f"{name} and {file_variable} are both set: set only one of them")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{file_variable}={path!r}: cannot read it: {exc.strerror}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ConfigError(f"{file_variable}={path!r}: over {MAX_SECRET_FILE_BYTES} bytes")
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{file_variable}={path!r}: not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{file_variable}={path!r}: the file is empty")
    return value
