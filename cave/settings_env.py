"""Settings declared field by field: each field of a settings model names its environment variable
and says what it means (`env_field`), and one loader reads any such model (`load_section`).

A variable is parsed by its field's type: bool (true/false, 1/0, yes/no), int, float (finite),
Path, a Literal's choices, str and secrets as text. A value that does not parse, or is outside
the field's bounds, is a ConfigError naming the variable and the value (`NAME='abc': expected a
positive integer`); a secret's value is never shown. A field's own validators and the model's
cross-field rules run when the section is validated; their errors name the variable too.

Nested sections are read recursively; `env_prefix` names a family (`CAVE_DEFAULT_` + field name,
upper case) for a model used twice. `declared(model)` lists every variable of a tree of sections:
docs/configuration.md is generated from it (config/docs.py).
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, Field, SecretBytes, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticUndefined

from cave.env import env_secret, parse_bool, parse_choice
from cave.errors import ConfigError

M = TypeVar("M", bound=BaseModel)
# (field names from the root model) -> (variable, its text; None for a secret, never shown)
Sources = dict[tuple[str, ...], tuple[str, str | None]]

_INTEGER = re.compile(r"[+-]?[0-9]+")
# Errors of a field's type or bounds: an environment value gets the field's "expected ...".
_TYPE_ERRORS = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "int_parsing",
    "int_from_float",
    "float_parsing",
    "finite_number",
}


def env_field(
    variable: str,
    default: Any = PydanticUndefined,
    *,
    description: str,
    secret_file: bool = False,
    blank_is_unset: bool = False,
    text: bool = False,
    accepts: str | None = None,
    shown_default: str | None = None,
    **constraints: Any,
) -> Any:
    """A settings field read from `variable`.

    `secret_file`: the value may come from the file `variable`_FILE names (a mounted secret);
    `blank_is_unset`: a blank value keeps the default; `text`: the text goes to the model's own
    validators (or the section's loader) unparsed; `accepts` and `shown_default` replace the
    generated words of the docs; `constraints` are pydantic's (gt, le, repr, ...)."""
    extra: dict[str, Any] = {"env": variable}
    for key, value in (
        ("secret_file", secret_file),
        ("blank_is_unset", blank_is_unset),
        ("text", text),
        ("accepts", accepts),
        ("shown_default", shown_default),
    ):
        if value:
            extra[key] = value
    return Field(default, description=description, json_schema_extra=extra, **constraints)


def env_prefix(
    prefix: str, default: Any = PydanticUndefined, *, title: str, description: str
) -> Any:
    """A nested section whose fields are read from `prefix` + the field's name in upper case
    (its own fields declare no variable: the model serves several prefixes)."""
    return Field(
        default, title=title, description=description, json_schema_extra={"env_prefix": prefix}
    )


@dataclass(frozen=True)
class Declared:
    """One leaf field of a tree of sections, and the variable it is read from (None: none)."""

    variable: str | None
    loc: tuple[str, ...]
    field: FieldInfo
    section: type[BaseModel]

    def option(self, key: str) -> Any:
        extra = self.field.json_schema_extra
        return extra.get(key) if isinstance(extra, dict) else None

    @property
    def variables(self) -> tuple[str, ...]:
        """The variable, and its _FILE variant for a secret that may come from a file."""
        if self.variable is None:
            return ()
        return (
            (self.variable, f"{self.variable}_FILE")
            if self.option("secret_file")
            else (self.variable,)
        )

    @property
    def secret(self) -> bool:
        return bool(self.option("secret_file")) or _base(self.field.annotation) in (
            SecretStr,
            SecretBytes,
            bytes,
        )

    def expected(self) -> str:
        """What the variable accepts, in words: `a positive integer`, `one of a, b`."""
        given = self.option("accepts")
        return str(given) if given else _expected(self.field)


def declared(model: type[BaseModel]) -> list[Declared]:
    """Every leaf field of `model` and its nested sections, in declaration order."""
    return list(_walk(model, None, ()))


def _walk(model: type[BaseModel], prefix: str | None, loc: tuple[str, ...]) -> Iterator[Declared]:
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        nested = _section_type(field)
        if nested is not None and "env" not in extra:
            prefix_of_nested = extra.get("env_prefix")
            yield from _walk(nested, str(prefix_of_nested or "") or None, (*loc, name))
            continue
        variable = extra.get("env") or (f"{prefix}{name.upper()}" if prefix else None)
        yield Declared(str(variable) if variable else None, (*loc, name), field, model)


def _section_type(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def read_env(
    model: type[BaseModel], env: Mapping[str, str], base: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], Sources]:
    """The values of `model`'s declared variables that `env` sets, parsed and bound-checked,
    laid over `base` (nested like the model), and where each came from."""
    values = _copy(base or {})
    sources: Sources = {}
    for item in declared(model):
        if item.variable is None:
            continue
        secret_file = item.option("secret_file")
        raw = env_secret(env, item.variable) if secret_file else env.get(item.variable)
        if raw is None or (item.option("blank_is_unset") and not raw.strip()):
            continue
        shown = None if item.secret else raw
        try:
            value = raw if item.option("text") else _parse(item, raw)
        except ValueError as exc:
            where = item.variable if shown is None else f"{item.variable}={raw!r}"
            raise ConfigError(f"{where}: {exc}") from None
        target = values
        for part in item.loc[:-1]:
            target = target.setdefault(part, {})
        target[item.loc[-1]] = value
        sources[item.loc] = (item.variable, shown)
    return values, sources


def validate(
    model: type[M], values: Mapping[str, Any], sources: Sources, origin: str | None = None
) -> M:
    """`model` from `values`; a ValidationError becomes a ConfigError naming the variable of each
    problem (or `origin: section.key=value` for a value that came from elsewhere)."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        by_loc = {item.loc: item for item in declared(model)}
        problems = [describe(error, sources, by_loc, origin) for error in exc.errors()]
        raise ConfigError("; ".join(problems)) from None


def load_section(model: type[M], env: Mapping[str, str]) -> M:
    """`model` read from its declared variables in `env`; a bad value is a ConfigError."""
    values, sources = read_env(model, env)
    return validate(model, values, sources)


def describe(
    error: ErrorDetails,
    sources: Sources,
    by_loc: Mapping[tuple[str, ...], Declared],
    origin: str | None = None,
) -> str:
    """One validation error in words, led by the variable (and value) it came from."""
    loc = tuple(str(part) for part in error["loc"])
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, ValueError):
        message = str(cause)  # our validators' words, without pydantic's "Value error, "
    elif loc in by_loc and loc in sources and error["type"] in _TYPE_ERRORS:
        message = f"expected {by_loc[loc].expected()}"
    else:
        message = error["msg"]
    if loc in sources:
        variable, shown = sources[loc]
        return f"{variable if shown is None else f'{variable}={shown!r}'}: {message}"
    where = f"{origin}: " if origin else ""
    if not loc or (isinstance(cause, ValueError) and loc not in by_loc):
        return f"{where}{message}"  # a rule of a whole section: its message names the fields
    hidden = error["type"] == "missing" or (loc in by_loc and by_loc[loc].secret)
    shown_input = "" if hidden else f"={error['input']!r}"
    return f"{where}{'.'.join(loc)}{shown_input}: {message}"


def _copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _base(annotation: Any) -> Any:
    """The type inside `X | None`."""
    if get_origin(annotation) in (Union, types.UnionType):
        inner = [arg for arg in get_args(annotation) if arg is not type(None)]
        return inner[0] if len(inner) == 1 else annotation
    return annotation


def _optional(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def _parse(item: Declared, raw: str) -> Any:
    kind = _base(item.field.annotation)
    if kind is bool:
        return parse_bool(raw)
    if get_origin(kind) is Literal:
        return parse_choice(raw, tuple(str(choice) for choice in get_args(kind)))
    if kind is int or kind is float:
        return _number(item, raw, kind)
    if kind is Path:
        if not raw.strip():
            if _optional(item.field.annotation):
                return None
            raise ValueError(f"expected {item.expected()}")
        return Path(raw.strip())
    return raw  # str, secrets: the model's validators judge the text


def _number(item: Declared, raw: str, kind: type) -> float:
    text = raw.strip()
    value: float
    if kind is int:
        value = int(text) if _INTEGER.fullmatch(text) else math.nan
    else:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
    if not math.isfinite(value) or not _within(value, item.field):
        raise ValueError(f"expected {item.expected()}")
    return value


def _bounds(field: FieldInfo) -> tuple[Any, Any, Any, Any]:
    """(gt, ge, lt, le) of a field, None where it has no such bound."""
    gt = ge = lt = le = None
    for rule in field.metadata:
        if isinstance(rule, Gt):
            gt = rule.gt
        elif isinstance(rule, Ge):
            ge = rule.ge
        elif isinstance(rule, Lt):
            lt = rule.lt
        elif isinstance(rule, Le):
            le = rule.le
    return gt, ge, lt, le


def _within(value: float, field: FieldInfo) -> bool:
    gt, ge, lt, le = _bounds(field)
    return not (
        (gt is not None and not value > gt)
        or (ge is not None and not value >= ge)
        or (lt is not None and not value < lt)
        or (le is not None and not value <= le)
    )


def _expected(field: FieldInfo) -> str:
    kind = _base(field.annotation)
    if kind is bool:
        return "true/false, 1/0 or yes/no"
    if get_origin(kind) is Literal:
        return f"one of {', '.join(str(choice) for choice in get_args(kind))}"
    if kind is int or kind is float:
        return _number_words(field, "integer" if kind is int else "number")
    if kind is Path:
        return "a path"
    return "a secret" if kind in (SecretStr, SecretBytes, bytes) else "text"


def _number_words(field: FieldInfo, noun: str) -> str:
    gt, ge, lt, le = _bounds(field)
    high = le if le is not None else lt
    a_noun = f"a{'n' if noun == 'integer' else ''} {noun}"
    if ge is not None and le is not None:
        return f"{a_noun} from {_show(ge)} to {_show(le)}"
    upto = ""
    if high is not None:
        upto = f" up to {_show(high)}" if le is not None else f" below {_show(high)}"
    if (gt is not None and gt == 0) or (noun == "integer" and ge == 1):
        return f"a positive {noun}{upto}"
    if ge is not None and ge == 0:
        return f"a non-negative {noun}{upto}"
    if ge is not None or gt is not None:
        low = f">= {_show(ge)}" if ge is not None else f"> {_show(gt)}"
        return f"{a_noun} {low}{upto}"
    return f"{a_noun}{upto}"


def _show(number: float) -> str:
    """12, 0.05, 2592000: a bound as a person writes it (`:g` would say 2.592e+06)."""
    return str(int(number)) if float(number).is_integer() else repr(float(number))


class CaveEnvironment(BaseModel, frozen=True, extra="forbid"):
    """Development or production: production refuses what development makes up or degrades."""

    production: bool = env_field(
        "CAVE_ENV",
        False,
        text=True,
        accepts="`production`, or any other word (development)",
        shown_default="`development`",
        description=(
            "`production` makes every part strict: no made-up secrets or database, no "
            "sandboxes without namespaces + seccomp + cgroups (see below, and isolation.md, "
            '"Failing closed"); any other value is development'
        ),
    )

    @field_validator("production", mode="before")
    @classmethod
    def _word(cls, value: object) -> object:
        return value.strip().lower() == "production" if isinstance(value, str) else value


def is_production(env: Mapping[str, str]) -> bool:
    """Whether `env` says CAVE_ENV=production (in any case, spaces around it ignored)."""
    return load_section(CaveEnvironment, env).production
