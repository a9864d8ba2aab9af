"""Command-line flags generated from a pydantic settings schema, so defaults, choices, ranges
and help live in one place (the schema) and every command shows them the same way.

A field `max_batch` becomes `--max-batch` (plus one flag per other name in its pydantic
`validation_alias=AliasChoices(...)`: `gkd_lambda` also answers to `--lambda`); its help reads "DESCRIPTION (default: 256; range:
>= 1; env: POTSTILL_MAX_BATCH)". Settings resolve, lowest to highest precedence: the schema's
defaults, a YAML file, environment variables (where the command takes them), then flags.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import AliasChoices, BaseModel
from pydantic.fields import FieldInfo

_BOUNDS = ((annotated_types.Ge, ">="), (annotated_types.Gt, ">"), (annotated_types.Le, "<="), (annotated_types.Lt, "<"))


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def flag_names(name: str, field: FieldInfo) -> list[str]:
    """The field's flag, then one per other name its `AliasChoices` validation alias accepts."""
    aliases = field.validation_alias.choices if isinstance(field.validation_alias, AliasChoices) else []
    return [flag_name(name), *(flag_name(alias) for alias in aliases if isinstance(alias, str) and alias != name)]


def env_name(field: str, prefix: str) -> str:
    return prefix + field.upper()


def add_schema_arguments(
    parser: argparse.ArgumentParser, schema: type[BaseModel], *, skip: Iterable[str] = (), env_prefix: str | None = None
) -> None:
    """One flag per field of `schema` (except `skip`); unset flags stay None so lower layers show through."""
    for name, field in schema.model_fields.items():
        if name in skip:
            continue
        kind, choices = _value_type(field.annotation)
        help_text = _help(name, field, choices, env_prefix)
        if kind is bool:
            parser.add_argument(*flag_names(name, field), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(*flag_names(name, field), dest=name, default=None, type=kind, choices=choices, help=help_text)


def settings_values(
    args: argparse.Namespace,
    schema: type[BaseModel],
    config_file: Path | None = None,
    env_prefix: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, Any]:
    """The values for `schema(**values)`: YAML file, then environment, then the flags that were given."""
    values = read_settings_file(config_file) if config_file is not None else {}
    if env_prefix is not None:
        for name in schema.model_fields:
            if env_name(name, env_prefix) in environ:
                values[name] = environ[env_name(name, env_prefix)]
    values.update({name: value for name in schema.model_fields if (value := getattr(args, name, None)) is not None})
    return values


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of settings; keys may be spelled as flags (`max-batch`) or fields (`max_batch`)."""
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
    return {key.replace("-", "_"): value for key, value in loaded.items()}


def _value_type(annotation: Any) -> tuple[type, list[str] | None]:
    """The argparse type of a field and its choices: Optional[X] is X, a Literal lists its choices."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is Literal:
        return str, [str(choice) for choice in typing.get_args(annotation)]
    if annotation in (bool, int, float):
        return annotation, None
    return str, None


def _help(name: str, field: FieldInfo, choices: list[str] | None, env_prefix: str | None) -> str:
    notes = ["required" if field.is_required() else f"default: {_shown(field)}"]
    if choices:
        notes.append("choices: " + ", ".join(choices))
    bounds = [f"{sign} {getattr(item, cls.__name__.lower())}" for item in field.metadata for cls, sign in _BOUNDS if isinstance(item, cls)]
    if bounds:
        notes.append("range: " + ", ".join(bounds))
    if env_prefix is not None:
        notes.append(f"env: {env_name(name, env_prefix)}")
    description = (field.description or "").rstrip(".")
    # argparse formats help with %-style: a literal percent sign must be doubled.
    return (f"{description} ({'; '.join(notes)})" if description else f"({'; '.join(notes)})").replace("%", "%%")


def _shown(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    return "none" if default is None else str(default)
