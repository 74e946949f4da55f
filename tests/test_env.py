"""Choice settings read from the environment: the value, the default, a clear error."""

from __future__ import annotations

import pytest

from cave.env import env_choice
from cave.errors import ConfigError
from cluster.ingress import ingress_choice
from deployments.exec_records import load_mode


def test_a_choice_is_read_in_any_case_with_its_default() -> None:
    assert env_choice({"X": " Sync "}, "X", "async", ("async", "sync")) == "sync"
    assert env_choice({}, "X", "async", ("async", "sync")) == "async"


@pytest.mark.parametrize(
    ("load", "name"), [(load_mode, "CAVE_EXEC_RECORDS"), (ingress_choice, "CAVE_INGRESS")]
)
def test_a_bad_choice_names_its_variable(load: object, name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}='nope': expected one of"):
        load({name: "nope"})  # type: ignore[operator]
