"""YAML loading, dotted overrides and validation errors that name the key and the valid ones."""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message says where and what is valid."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give an experiment YAML file (lpm-llm list shows the bundled ones)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the config file {path}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except ValueError as e:  # a scalar YAML recognises but cannot build, e.g. the date 2020-13-45
        raise ConfigError(f"{path}: {_locate_bad_value(text) or 'a value'}: not a valid value ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _locate_bad_value(text: str) -> str:
    """'key.path (line N)' of the first scalar in the YAML text that cannot be built, or ''."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return ""
    builder = yaml.SafeLoader("")

    def walk(node: yaml.Node, path: list[str]) -> str:
        if isinstance(node, yaml.MappingNode):
            children = [(str(k.value), v) for k, v in node.value]
        elif isinstance(node, yaml.SequenceNode):
            children = [(str(i), v) for i, v in enumerate(node.value)]
        else:
            try:
                builder.construct_object(node, deep=True)
            except (ValueError, yaml.YAMLError):
                return f"{'.'.join(path) or '(top level)'} (line {node.start_mark.line + 1})"
            return ""
        for name, child in children:
            found = walk(child, [*path, name])
            if found:
                return found
        return ""

    return walk(root, []) if root is not None else ""


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``override`` merged in: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(assignments: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["llm.concurrency=4", "days=30"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set llm.concurrency=4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None
        except ValueError as e:  # e.g. a date YAML recognises but cannot build: 2020-13-45
            raise ConfigError(f"--set {item!r}: {key.strip()}: {raw!r} is not a valid value ({e})") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is set twice with different shapes")
        node[parts[-1]] = value
    return out


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The nested pydantic model class that a validation error location points into."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """The BaseModel inside Optional[...] / dict[str, Model] / list[Model] annotations, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple, dict) or origin is not None:
        for arg in typing.get_args(annotation):
            found = _unwrap(arg)
            if found is not None:
                return found
    return None


def validate(model: type[BaseModel], data: Mapping[str, Any], source: str) -> BaseModel:
    """``model.model_validate(data)`` with every error rewritten as 'source: key: what is valid'."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = tuple(err["loc"])
            dotted = ".".join(str(p) for p in loc)
            if err["type"] == "extra_forbidden":
                parent = _model_at(model, loc[:-1])
                valid = ", ".join(sorted(parent.model_fields)) if parent else "?"
                where = ".".join(str(p) for p in loc[:-1]) or "the top level"
                lines.append(f"unknown key {dotted!r}; valid keys under {where}: {valid}")
            else:
                lines.append(f"{dotted or '(top level)'}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None
