"""Loading a configuration: YAML (only what differs from the defaults in `medqa.schema`), then dotted
`key=value` overrides from the command line, then `validate()` on every section.

Unknown keys and wrong types raise `ConfigError` with a one-paragraph message (and the closest valid key).
`resolved_yaml` prints the whole resolved config (`--print-config`); `differences` gives what a config file
needs to hold.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from medqa.errors import ConfigError
from medqa.schema import (
    FIELDS,
    Config,
    DataConfig,
    EvaluateConfig,
    GenerateConfig,
    LoraConfig,
    ModelConfig,
    PromptConfig,
    ScoringConfig,
    TinyModelConfig,
    TrainConfig,
    TuneConfig,
)

__all__ = [
    "Config",
    "DataConfig",
    "EvaluateConfig",
    "GenerateConfig",
    "LoraConfig",
    "ModelConfig",
    "PromptConfig",
    "ScoringConfig",
    "TinyModelConfig",
    "TrainConfig",
    "TuneConfig",
    "RENAMED",
    "config_from_dict",
    "describe_fields",
    "differences",
    "load_config",
    "parse_overrides",
    "resolved_yaml",
]

# Sections renamed since earlier releases: old YAML files and overrides still load, with a warning.
RENAMED = {"eval": "scoring"}

# --------------------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotated type `tp`; accept ints for floats. Raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None  # an optional field left unset (data.sources[i].question_field: data's)
        if len(args) == 1:
            return _coerce(value, args[0], key)
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        expected = " or ".join(_type_name(arg) for arg in args)
        raise ConfigError(f"`{key}` has the wrong type: got {value!r}; expected {expected}.")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"`{key}` must be a list, got {value!r}.")
        (item_tp,) = typing.get_args(tp) or (Any,)
        if dataclasses.is_dataclass(item_tp):  # a list of entries (data.sources): each is named by its index
            return [_entry(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return [_coerce(v, item_tp, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"`{key}` must be a mapping, got {value!r}.")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp is str and value is False and key in FIELDS and "no" in FIELDS[key].metadata["choices"]:
        return "no"  # YAML 1.1 reads an unquoted `no` (train.mixed_precision: no) as false
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(
            f"`{key}` must be of type {_type_name(tp)}, got {value!r} ({type(value).__name__}). "
            f"Fix the value in the YAML file or the `{key.split('[')[0]}=...` override."
        )
    return value


def _entry(value: Any, tp: type, key: str) -> Any:
    """One entry of a list of dataclasses (`key`: data.sources[i]): a mapping of its fields, each checked as a
    field is (unknown keys and wrong types refused, naming data.sources[i].<key>)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be {tp.shape()}; got {value!r}.")
    entry = tp()
    _apply(entry, value, f"{key}.")
    return entry


def _apply(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(full, valid, n=1, cutoff=0.5)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise ConfigError(
                f"Unknown config key `{full}`.{hint} Valid keys here: {', '.join(valid)}. "
                "See `medqa --help` for every field."
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"`{full}` is a section; give a mapping or set `{full}.<field>=...`.")
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _renamed(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Map sections renamed since earlier releases to their new names, with a warning naming the change."""
    import logging

    out = dict(values)
    for old, new in RENAMED.items():
        if old in out:
            if new in out:
                raise ConfigError(
                    f"{where} sets both `{old}` and `{new}`; `{old}` is the old name of `{new}`. Keep only `{new}`."
                )
            logging.getLogger(__name__).warning("%s: section `%s` is now called `%s`; rename it.", where, old, new)
            out[new] = out.pop(old)
    return out


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def parse_overrides(overrides: list[str]) -> list[dict[str, Any]]:
    """Turn `a.b=value` strings into nested dicts; values are parsed as YAML scalars (1e-4, true, [a, b])."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} is not of the form key=value (e.g. data.seed=7).")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append(_nest(key.strip(), value))
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults), apply dotted overrides, validate, and return it."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"Config file {path} not found. Use one of the files under configs/, e.g. --config configs/demo.yaml."
            )
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {path} is not valid YAML: {exc}. Fix the syntax.") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of sections, got {type(loaded).__name__}.")
        _apply(cfg, _renamed(loaded, str(path)))
    for nested in parse_overrides(overrides or []):
        _apply(cfg, _renamed(nested, "an override"))
    return cfg.validate()


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. inside a Ray trial), then apply overrides."""
    cfg = Config()
    _apply(cfg, _renamed(values, "the stored config"))
    for nested in parse_overrides(overrides or []):
        _apply(cfg, _renamed(nested, "an override"))
    return cfg.validate()


def describe_fields(obj: Any = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, for `--help`."""
    obj = obj if obj is not None else Config()
    rows = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe_fields(value, f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", repr(value), f.metadata.get("help", "")))
    return rows


def differences(cfg: Config, base: Config | None = None) -> dict[str, Any]:
    """The nested mapping of the fields where `cfg` differs from `base` (default: the dataclass defaults): what
    a config file for `cfg` needs to hold."""

    def diff(a: dict, b: dict) -> dict:
        out = {}
        for key, value in a.items():
            if isinstance(value, dict) and isinstance(b.get(key), dict):
                sub = diff(value, b[key])
                if sub:
                    out[key] = sub
            elif value != b.get(key):
                out[key] = value
        return out

    return diff(cfg.to_dict(), (base or Config()).to_dict())


def resolved_yaml(cfg: Config) -> str:
    """The whole resolved config as YAML, every field (`--print-config`); loads back to the same config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
