"""Command-line options generated from a pydantic config model, so a command's options and its config fields
cannot drift apart (`prefpipe stage NAME` and `prefpipe train` both build theirs here).

A field `max_steps` becomes `--max-steps`; a field of a nested model becomes `--SECTION.FIELD` (`--loss.beta`,
`--list-loss.loss-type`); a bool becomes `--x/--no-x`. Every option defaults to None, meaning "not given", so
values from a config file stand unless the command line names them. Fields holding lists or unions take one
string: a YAML value (`[0.9, 0.95]`, `null`) or, without brackets, a comma-separated list (`sigmoid,sft`).
"""
from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Optional

import typer
import yaml
from pydantic import BaseModel

_SIMPLE = (int, float, str, bool)
SEP = "__"  # a nested field's parameter name: loss__beta (the option is --loss.beta)


def option_type(annotation: Any) -> type | None:
    """The click-friendly type of a field, or None when it holds a list, a union or a nested model."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return option_type(args[0]) if len(args) == 1 else None
    if origin is typing.Annotated:
        return option_type(typing.get_args(annotation)[0])
    return annotation if annotation in _SIMPLE else None


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _dashed(name: str) -> str:
    return name.strip("_").replace("_", "-")


def _help(field) -> str:
    default = field.default if field.default_factory is None else field.default_factory()
    return f"{field.description or ''} [default: {default}]".strip()


def model_options(model: type[BaseModel], *, panel: str, nested: bool = False, lists: bool = False,
                  skip: frozenset[str] = frozenset(), _prefix: str = "",
                  _panels: dict[str, str] | None = None) -> list[inspect.Parameter]:
    """Keyword-only parameters (typer options) for the fields of `model`. `nested`: descend into nested models
    (their options go to a help panel of their own); `lists`: also fields holding lists or unions (as one string,
    see `parse_value`); else those come only from the config file."""
    params = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        sub = _nested_model(field.annotation)
        if sub is not None:
            if nested:
                params += model_options(sub, panel=f"{panel}: {name}", nested=True, lists=lists,
                                        _prefix=f"{_prefix}{name}.")
            continue
        t = option_type(field.annotation)
        if t is None and not lists:
            continue
        flag = f"--{_prefix.replace('_', '-')}{_dashed(name)}"
        if t is bool:
            negative = f"--{_prefix.replace('_', '-')}no-{_dashed(name)}"
            decls = [f"{flag}/{negative}"]
        else:
            decls = [flag]
        params.append(inspect.Parameter(
            (_prefix + name).replace(".", SEP), inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[t if t is not None else str],
            default=typer.Option(None, *decls, help=_help(field), rich_help_panel=panel)))
    return params


def parse_value(text: str) -> Any:
    """One option string for a list/union field: YAML (`[0.9, 0.95]`, `null`, `auto`), or a comma list."""
    stripped = text.strip()
    if "," in stripped and not stripped.startswith(("[", "{")):
        return [part.strip() for part in stripped.split(",") if part.strip()]
    try:
        return yaml.safe_load(stripped)
    except yaml.YAMLError:
        return stripped


def collect(values: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """Given options (None = not given) -> a nested dict of config fields; list/union fields parsed."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        path = key.split(SEP)
        cls: type[BaseModel] | None = model
        for part in path[:-1]:
            cls = _nested_model(cls.model_fields[part].annotation) if cls is not None else None
        field = cls.model_fields.get(path[-1]) if cls is not None else None
        if isinstance(value, str) and field is not None and option_type(field.annotation) is None:
            value = parse_value(value)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out
