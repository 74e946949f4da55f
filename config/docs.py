"""Writes the settings reference of docs/configuration.md from the tree (config/tree.py):
`python -m config.docs [PATH]` (`make config-docs`), or `--check` to fail when it is stale.

Only the part between the two marker comments is written; the prose around it is kept.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from cave.settings_env import Declared, declared
from config.settings import load_settings
from config.tree import CaveSettings

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
BEGIN = (
    "<!-- BEGIN SETTINGS REFERENCE: written by `make config-docs` (config/docs.py) from the "
    "settings' fields; edit those, not this part -->"
)
END = "<!-- END SETTINGS REFERENCE -->"
_MIB = 1024 * 1024


def render() -> str:
    """The reference: one part per section of the tree, one table per group of settings."""
    parts = []
    for name, field in CaveSettings.model_fields.items():
        model = _model(field)
        assert model is not None, f"the tree's field {name} is not a section"
        toml = _extra(field).get("toml")
        instance = load_settings(env={}) if toml else None  # defaults from the shipped file
        parts.append(_section(name, field, model, toml, instance))
    return "\n".join(parts)


def update(text: str) -> str:
    """`text` (the document) with its reference part replaced by `render()`."""
    try:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise SystemExit(f"the document lacks the markers {BEGIN!r} and {END!r}") from None
    return f"{head}{BEGIN}\n\n{render()}\n{END}{tail}"


def _section(
    name: str, field: FieldInfo, model: type[BaseModel], toml: Any, instance: BaseModel | None
) -> str:
    lines = [f"### {field.title}", "", f"{_doc(model)} Read by {field.description}."]
    if toml:
        lines[-1] += f" Each setting is a key of `{toml}`; a variable, when set, wins over it."
    rows = [item for item in declared(model) if len(item.loc) == 1]
    if rows:
        lines += ["", *_table(rows, name, toml, instance)]
    for sub_name, sub_field in model.model_fields.items():
        sub_model = _model(sub_field)
        if sub_model is None or "env" in _extra(sub_field):
            continue
        intro = sub_field.description or _doc(sub_model)
        lines += ["", f"#### {sub_field.title or sub_name}", "", intro, ""]
        sub_rows = [item for item in declared(model) if item.loc[0] == sub_name]
        lines += _table(sub_rows, name, toml, instance)
    return "\n".join(lines) + "\n"


def _table(items: list[Declared], section: str, toml: Any, instance: BaseModel | None) -> list[str]:
    head = ["Variable", *(["TOML key"] if toml else []), "Default", "Accepts", "Meaning"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for item in items:
        if item.variable is None and not (toml and item.field.description):
            continue  # set by the code (or by another section's variable), not configurable
        cells = [_variables(item)]
        if toml:
            cells.append(f"`{'.'.join(item.loc)}`")
        expected = item.expected() if item.variable else "TOML only"
        cells += [_default(item, instance), expected, item.field.description or ""]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return lines


def _variables(item: Declared) -> str:
    names = [f"`{name}`" for name in item.variables]
    if not names:
        return "—"
    return names[0] if len(names) == 1 else f"{names[0]} (or {names[1]})"


def _default(item: Declared, instance: BaseModel | None) -> str:
    shown = item.option("shown_default")
    if shown:
        return str(shown)
    value: Any = item.field.default
    if instance is not None:
        value = instance
        for part in item.loc:
            value = getattr(value, part)
    if value is PydanticUndefined:
        return "required"
    return _value(value, item.loc[-1])


def _value(value: Any, name: str) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int) and name.endswith("_bytes") and value % _MIB == 0:
        return f"{value} ({value // _MIB} MiB)"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, tuple | list):
        return "`[" + ", ".join(f'"{v}"' for v in value) + "]`"
    return f"`{value}`" if str(value) else "empty"


def _doc(model: type[BaseModel]) -> str:
    return " ".join(inspect.cleandoc(model.__doc__ or "").split())


def _model(field: FieldInfo) -> type[BaseModel] | None:
    kind = field.annotation
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _extra(field: FieldInfo) -> dict[str, Any]:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [arg for arg in argv if arg != "--check"]
    path = Path(paths[0]) if paths else DOC
    text = path.read_text()
    fresh = update(text)
    if check:
        if fresh != text:
            print(f"{path} is stale: run `make config-docs`", file=sys.stderr)
            return 1
        return 0
    if fresh != text:
        path.write_text(fresh)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
