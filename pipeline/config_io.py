"""Reading and checking config files: the one reader behind stage, train and run configs.

`read_config` turns a YAML or JSON file into a dict, refusing what YAML or JSON would otherwise accept silently:
a key given twice (the second would win without a word), bytes that are not UTF-8, a top level that is not a
mapping. `validate` checks that dict against a pydantic model and reports the first problem as one `InputError`
naming the file and the dotted key (`train.2.config.lr`). Both run before any model loads.

The field types below are for config models: `FiniteFloat` (YAML's `.inf` and `.nan` are floats, and pydantic's
bounds let `inf` through `gt=0`), `NonEmptyStr` (a stop string "" would match at position 0 and cut every text
to nothing) and `PathComponent` (a name that becomes one folder or file name inside the output).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, AllowInfNan, BaseModel, StringConstraints, ValidationError

from schemas.errors import InputError

FiniteFloat = Annotated[float, AllowInfNan(False)]
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]


def _path_component(name: str) -> str:
    # One folder or file name under the output: never a way out of it (`..`, `/`, an absolute path), never
    # hidden (a leading dot), never a byte the filesystem refuses (NUL).
    bad = ("/" in name or "\\" in name or "\0" in name or name in ("", ".", "..") or name.startswith(".")
           or name != name.strip())
    if bad:
        raise ValueError(f"{name!r} is not a safe name: it becomes a path, so it must be one folder name (no "
                         f"'/', '\\', NUL, leading dot or surrounding spaces)")
    return name


PathComponent = Annotated[str, AfterValidator(_path_component)]

M = TypeVar("M", bound=BaseModel)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then a key of its own overrides on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (list, dict)):
            continue  # unhashable: SafeLoader's own error names it below
        if key in seen:
            raise InputError(f"key {key!r} is given twice (lines {seen[key] + 1} and "
                             f"{key_node.start_mark.line + 1})", column=str(key))
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise InputError(f"key {key!r} is given twice", column=key)
        out[key] = value
    return out


def read_config(path: str | Path, what: str = "config") -> dict:
    """The mapping in a YAML (or `.json`) file; an empty file is an empty mapping."""
    p, file = Path(path), str(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise InputError("no such config file", file=file) from None
    except IsADirectoryError:
        raise InputError("the config file is a folder", file=file) from None
    except OSError as e:
        raise InputError(f"cannot read it ({what}): {e.strerror}", file=file) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text (byte {e.start})", file=file) from None
    try:
        if p.suffix.lower() == ".json":
            raw = json.loads(text, object_pairs_hook=_json_pairs)
        else:
            raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except InputError as e:
        raise InputError(e.reason, file=file, column=e.column) from None
    except (yaml.YAMLError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {_syntax(e)}",
                         file=file) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f"the {what} must be a mapping of field: value, not a {type(raw).__name__}", file=file)
    return raw


def _syntax(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        return f"{getattr(e, 'problem', None) or 'syntax error'} at line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def dotted(loc: tuple | list) -> str:
    return ".".join(str(p) for p in loc)


def _non_finite(value: Any, loc: tuple) -> tuple | None:
    """The location of the first non-finite float inside a validated config (nested models, lists, dicts)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else loc
    if isinstance(value, BaseModel):
        items = ((k, getattr(value, k)) for k in type(value).model_fields)
    elif isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        found = _non_finite(v, (*loc, k))
        if found is not None:
            return found
    return None


def validate(model: type[M], data: Any, *, file: str | None, prefix: tuple = (), what: str = "config") -> M:
    """`model` built from `data`, or an InputError naming `file` and the dotted key of the first problem (under
    `prefix`, the place of `data` inside a larger file). Floats anywhere inside must be finite, also in nested
    models declared without `FiniteFloat`."""
    try:
        obj = model.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        err = errors[0]
        more = f" (and {len(errors) - 1} more problem(s) in the {what})" if len(errors) > 1 else ""
        key = dotted((*prefix, *err["loc"])) or None
        raise InputError(f"{err['msg']}{more}", file=file, column=key) from None
    bad = _non_finite(obj, tuple(prefix))
    if bad is not None:
        raise InputError("must be a finite number (not inf or nan)", file=file, column=dotted(bad))
    return obj
