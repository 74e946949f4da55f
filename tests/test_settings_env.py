"""The one loader of declared settings (cave/settings_env.py): parsing by the field's type, bounds,
blank values, secrets from files, families of variables, and the words of its errors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field, SecretStr, model_validator

from cave.errors import ConfigError
from cave.settings_env import (
    CaveEnvironment,
    declared,
    env_field,
    env_prefix,
    is_production,
    load_section,
)


class Limits(BaseModel, frozen=True):
    """Its variables are named by the section that holds it (env_prefix)."""

    count: int = Field(3, ge=1, description="a count")
    ratio: float = Field(0.5, ge=0, le=1, description="a fraction")


class Section(BaseModel, frozen=True, extra="forbid"):
    flag: bool = env_field("T_FLAG", False, description="a flag")
    mode: Literal["fast", "safe"] = env_field("T_MODE", "safe", description="a mode")
    path: Path | None = env_field("T_PATH", None, description="a path")
    quiet: int = env_field("T_QUIET", 7, ge=0, blank_is_unset=True, description="blank: 7")
    token: SecretStr | None = env_field("T_TOKEN", None, secret_file=True, description="secret")
    low: Limits = env_prefix("T_LOW_", Limits(), title="low", description="the low limits")

    @model_validator(mode="after")
    def _fast_needs_flag(self) -> Section:
        if self.mode == "fast" and not self.flag:
            raise ValueError("T_MODE=fast needs T_FLAG=true")
        return self


def test_values_are_parsed_by_their_field_type(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret\n")
    env = {
        "T_FLAG": "Yes",
        "T_MODE": " FAST ",
        "T_PATH": " /srv/x ",
        "T_TOKEN_FILE": str(tmp_path / "token"),
        "T_LOW_COUNT": "+4",
        "T_LOW_RATIO": "1",
    }
    section = load_section(Section, env)
    assert (section.flag, section.mode, section.path) == (True, "fast", Path("/srv/x"))
    assert section.token is not None and section.token.get_secret_value() == "s3cret"
    assert section.low == Limits(count=4, ratio=1.0)
    assert load_section(Section, {}) == Section()


@pytest.mark.parametrize(
    ("variable", "raw", "expected"),
    [
        ("T_FLAG", "on", "expected true/false, 1/0 or yes/no"),
        ("T_MODE", "slow", "expected one of fast, safe"),
        ("T_QUIET", "-1", "expected a non-negative integer"),
        ("T_LOW_COUNT", "0", "expected a positive integer"),
        ("T_LOW_COUNT", "1.5", "expected a positive integer"),
        ("T_LOW_COUNT", "1_000", "expected a positive integer"),
        ("T_LOW_RATIO", "nan", "expected a number from 0 to 1"),
        ("T_LOW_RATIO", "1.5", "expected a number from 0 to 1"),
    ],
)
def test_a_bad_value_names_its_variable_and_value(variable: str, raw: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_section(Section, {variable: raw})
    assert str(caught.value) == f"{variable}={raw!r}: {expected}"


def test_blank_keeps_the_default_only_where_declared() -> None:
    assert load_section(Section, {"T_QUIET": " "}).quiet == 7
    assert load_section(Section, {"T_PATH": ""}).path is None  # optional path: blank is none
    with pytest.raises(ConfigError, match="^T_LOW_COUNT='': expected a positive integer"):
        load_section(Section, {"T_LOW_COUNT": ""})


def test_a_rule_of_the_section_speaks_for_itself() -> None:
    with pytest.raises(ConfigError) as caught:
        load_section(Section, {"T_MODE": "fast"})
    assert str(caught.value) == "T_MODE=fast needs T_FLAG=true"


def test_a_secret_is_never_shown(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file")
    with pytest.raises(ConfigError, match="T_TOKEN and T_TOKEN_FILE are both set") as caught:
        load_section(Section, {"T_TOKEN": "from-env", "T_TOKEN_FILE": str(tmp_path / "token")})
    assert "from-env" not in str(caught.value) and "from-file" not in str(caught.value)


def test_declared_lists_every_leaf_with_its_variable() -> None:
    found = {item.variable: item.loc for item in declared(Section)}
    assert found["T_LOW_COUNT"] == ("low", "count") and found["T_FLAG"] == ("flag",)
    token = next(item for item in declared(Section) if item.variable == "T_TOKEN")
    assert token.variables == ("T_TOKEN", "T_TOKEN_FILE") and token.secret


@pytest.mark.parametrize(
    ("raw", "production"), [(None, False), ("development", False), (" Production ", True)]
)
def test_the_run_mode_is_read_in_one_place(raw: str | None, production: bool) -> None:
    env = {} if raw is None else {"CAVE_ENV": raw}
    assert is_production(env) is production
    assert load_section(CaveEnvironment, env).production is production
