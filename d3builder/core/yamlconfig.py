"""Typed YAML configuration: dataclasses validated on load, errors naming file and key."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file is invalid; the message names the file and the key."""

    def __init__(self, file: str | Path, key: str, message: str) -> None:
        self.file, self.key = str(file), key
        super().__init__(f"{file}: {key or '<top level>'}: {message}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with safe_load; a missing or unreadable file or a non-mapping is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "", "file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"cannot be read: {exc}") from exc
    return parse_yaml(text, path)


def parse_yaml(text: str, source: str | Path) -> dict[str, Any]:
    """A YAML mapping from text (safe_load); a syntax error or a non-mapping is a ConfigError naming `source`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(source, "", "must be a mapping of keys to values")
    return data


def _check_value(value: Any, annotation: Any, file: str | Path, key: str) -> Any:
    """Check (and lightly coerce) one value against a type annotation."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, file, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(file, key, f"value {value!r} does not match {annotation}")
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(file, key, f"must be a mapping, got {type(value).__name__}")
        return from_mapping(annotation, value, file, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(file, key, f"must be a list, got {type(value).__name__}")
        (item_type, *_) = get_args(annotation) or (Any,)
        items = [_check_value(v, item_type, file, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(file, key, f"must be a mapping, got {type(value).__name__}")
        key_type, value_type = get_args(annotation) or (Any, Any)
        return {
            _check_value(k, key_type, file, f"{key}.{k}"): _check_value(v, value_type, file, f"{key}.{k}")
            for k, v in value.items()
        }
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if isinstance(value, bool) and annotation is not bool:
            raise ConfigError(file, key, f"must be {annotation.__name__}, got a boolean")
        if not isinstance(value, annotation):
            raise ConfigError(file, key, f"must be {annotation.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def from_mapping(cls: type[T], data: dict[str, Any], file: str | Path, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping: unknown keys, missing keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dotted = (prefix + ".") if prefix else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(file, dotted + unknown[0], f"unknown key (allowed: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, field in fields.items():
        key = dotted + name
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(file, key, "required key is missing")
            continue
        kwargs[name] = _check_value(data[name], hints[name], file, key)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(file, prefix, str(exc)) from exc
    return obj
