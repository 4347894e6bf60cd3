"""Stage configs: YAML files loaded into documented dataclasses, with ``key=value`` overrides.

Every stage declares its config as a dataclass whose fields carry their own documentation
(``field(metadata={"help": ...})``), the way TRL's config classes do. Unknown keys and values of
the wrong type are errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from alignkit.errors import AlignkitError

T = TypeVar("T")


class ConfigError(AlignkitError, ValueError):
    """A config key that is unknown, mistyped or out of range (exit 2)."""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {annotation.__name__}, got {value!r}")
        return from_dict(annotation, value, where)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") if args else v for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from a dict, checking keys and types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}: {k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    return obj


def parse_overrides(overrides: list[str]) -> dict:
    """``["lr=1e-4", "lora.r=8"]`` -> ``{"lr": 1e-4, "lora": {"r": 8}}`` (values parsed as YAML)."""
    result: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (for example max_steps=10)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return result


def merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` on top, nested mappings merged key by key (neither is changed)."""
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def check_range(cfg, low: float, *names: str, high: float | None = None) -> None:
    """Each named field is a number ``>= low`` (and ``< high`` when given), or None: else a
    ConfigError naming the field, the range and the value."""
    for name in names:
        value = getattr(cfg, name)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low and (
            high is None or value < high) and value == value  # NaN compares unequal to itself
        if not ok:
            expected = f"a number in [{low}, {high})" if high is not None else f"a number >= {low}"
            raise ConfigError(f"{name}: expected {expected}, got {value!r}")


class NotUtf8Error(ValueError):
    """Bytes that are not UTF-8 text, located by line (1-based) and byte offset."""

    def __init__(self, raw: bytes, err: UnicodeDecodeError):
        self.line = raw.count(b"\n", 0, err.start) + 1
        super().__init__(f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save the file as UTF-8")


def decode_utf8(raw: bytes) -> str:
    """``raw`` as text, or :class:`NotUtf8Error` naming the line and the byte (config and data
    files share this, so neither shows a UnicodeDecodeError traceback)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotUtf8Error(raw, e) from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(decode_utf8(path.read_bytes())) or {}
    except NotUtf8Error as e:
        raise ConfigError(f"{path}: line {e.line}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None, section: str | None = None) -> T:
    """Load ``cls`` from a YAML file (optionally one top-level ``section`` of it) plus overrides.

    Relative paths in the config stay relative to the working directory, as on the command line.
    """
    data: dict = {}
    where = "config"
    if path is not None:
        data = read_yaml(path)
        where = str(path)
        if section is not None:
            data = data.get(section) or {}
            where = f"{path}: {section}"
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data, where)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def describe(cls: type) -> str:
    """A plain-text table of a config's keys, defaults and help, for ``--help``."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)"
        )
        if dataclasses.is_dataclass(default):
            default = "{...}"
        lines.append(f"  {f.name} = {default!r}\n      {f.metadata.get('help', '')}")
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and dataclasses.is_dataclass(
            typing.get_type_hints(cls).get(f.name))):
            sub = typing.get_type_hints(cls)[f.name]
            for sf in dataclasses.fields(sub):
                sd = sf.default if sf.default is not dataclasses.MISSING else (
                    sf.default_factory() if sf.default_factory is not dataclasses.MISSING else "(required)")
                lines.append(f"  {f.name}.{sf.name} = {sd!r}\n      {sf.metadata.get('help', '')}")
    return "\n".join(lines)


def doc(help: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with its help text (shown by ``--help`` and in docs)."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def add_config_args(parser, cls: type | None, example: str, force_help: str | None = "run again from scratch even "
                    "if completed", positional: bool = False) -> None:
    """The arguments of every config-driven command: the config file (``--config FILE``, or
    ``FILE`` with ``positional``), ``--force`` and ``KEY=VALUE`` overrides; the command's help ends
    with ``cls``'s keys, defaults and meaning (None: a pointer to the command's own ``--help``, for
    commands that list their keys only when asked; ``force_help`` None: no ``--force``)."""
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "config keys (YAML or KEY=VALUE):\n" + (describe(cls) if cls else "  (see this command's --help)")
    if positional:
        parser.add_argument("config", help=f"YAML config ({example})")
    else:
        parser.add_argument("--config", help=f"YAML config ({example}); keys below")
    if force_help:  # commands whose runs are never skipped have nothing to force
        parser.add_argument("--force", action="store_true", help=force_help)
    parser.set_defaults(force=False)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys (nested: lora.r=8)")

