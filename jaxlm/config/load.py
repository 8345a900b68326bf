"""Loading a RunConfig: YAML file plus `section.key=value` overrides, family defaults filled
in, validated; and writing it back (dict, YAML, the key reference)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import fields
from typing import Any

import yaml

from jaxlm.config.files import read_utf8
from jaxlm.config.schema import (
    _SECTION_CLASSES,
    FAMILY_DEFAULTS,
    RECURRENT_DEFAULTS,
    ModelConfig,
    RunConfig,
)
from jaxlm.config.validate import validate
from jaxlm.errors import ConfigError
from jaxlm.paths import Path, as_path


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error
    rather than the last value silently winning."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # `<<: *anchor` merges may be overridden; complex keys fail later
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"'{key}' appears twice in one mapping (line {key_node.start_mark.line + 1}"
                    f" of {self.name}); keep one of them."
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """The plain YAML data of a file, refusing duplicate keys, Python tags and non-UTF-8."""
    loader = _UniqueKeyLoader(read_utf8(path))
    loader.name = f"'{path}'"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(key, value, args[0])
    if value is None:
        raise ConfigError(f"{key} may not be null; give it a value of type {typ.__name__}.")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {value!r}.")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}.")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:  # PyYAML reads "1e-3" as a string; accept it as the number it means
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}.")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}.")
    if origin is list:  # a list of plain YAML values (mappings included), checked in validate
        if isinstance(value, list):
            return list(value)
        raise ConfigError(f"{key} must be a list, got {value!r}.")
    raise TypeError(f"unsupported config field type {typ!r} for {key}")


def _build_section(name: str, raw: Any) -> Any:
    cls = _SECTION_CLASSES[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"Config section '{name}' must be a mapping of keys to values.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                f"Unknown config key '{name}.{key}'; valid keys in '{name}' are: "
                f"{', '.join(sorted(known))}."
            )
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build (but do not validate) a RunConfig from nested plain data."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("The config file must be a YAML mapping with sections like 'model:'.")
    for name in raw:
        if name not in _SECTION_CLASSES:
            raise ConfigError(
                f"Unknown config section '{name}'; valid sections are: "
                f"{', '.join(_SECTION_CLASSES)}."
            )
    return RunConfig(**{name: _build_section(name, raw.get(name)) for name in _SECTION_CLASSES})


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ['model.n_layers=4', ...] into {'model': {'n_layers': '4'}}; values stay strings."""
    out: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' is not of the form section.key=value.")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"Override key '{dotted}' must be section.key, e.g. model.n_layers.")
        section, key = parts
        if section not in _SECTION_CLASSES:
            raise ConfigError(
                f"Unknown config section '{section}' in override '{item}'; valid sections are: "
                f"{', '.join(_SECTION_CLASSES)}."
            )
        # YAML-parse the value so lists/null/true work, but keep plain strings as written.
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        out.setdefault(section, {})[key] = value if isinstance(parsed, str) else parsed
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply overrides, fill family defaults and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = as_path(path, "--config")
        if p.is_dir():
            raise ConfigError(
                f"Config file '{path}' is a directory; pass --config a YAML file inside it."
            )
        if not p.is_file():
            raise ConfigError(
                f"Config file '{path}' does not exist; pass --config with a YAML file."
            )
        try:
            raw = read_yaml(p) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(
                f"Config file '{path}' is not valid YAML{where} (only plain YAML is accepted, "
                f"no Python tags); fix the file there."
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(
                f"Config file '{path}' must hold a mapping with sections like 'model:'."
            )
    for section, kv in parse_overrides(overrides or []).items():
        if not isinstance(raw.get(section) or {}, dict):
            raise ConfigError(f"Config section '{section}' must be a mapping of keys to values.")
        raw[section] = {**(raw.get(section) or {}), **kv}
    cfg = resolve(from_dict(raw))
    validate(cfg)
    return cfg


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill the model options left at null from the family's defaults."""
    m = cfg.model
    families = {**FAMILY_DEFAULTS, **RECURRENT_DEFAULTS}
    if m.family not in families:
        raise ConfigError(
            f"model.family={m.family!r} is not known; use one of {', '.join(families)}."
        )
    fill = {k: v for k, v in families[m.family].items() if getattr(m, k) is None}
    return dataclasses.replace(cfg, model=dataclasses.replace(m, **fill))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML, JSON and checkpoint metadata)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    """The config as YAML text that `load_config` reads back to an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def describe() -> str:
    """A reference listing of every key with its default and description.

    Model fields that may change when resuming or fine-tuning are tagged `[runtime]`.
    """
    lines = []
    for name, cls in _SECTION_CLASSES.items():
        lines.append(f"{name}:  # {cls.__doc__}")
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = json.dumps(default) if isinstance(default, str) else yaml.safe_dump(default)
            shown = shown.strip().removesuffix("...").strip()
            tag = "[runtime] " if cls is ModelConfig and f.metadata["runtime"] else ""
            lines.append(f"  {f.name}: {shown}  # {tag}{f.metadata['doc']}")
    return "\n".join(lines)
