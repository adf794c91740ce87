"""YAML + `key.sub=value` overrides → a validated `Config`, and back to YAML."""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from jaxft.config.base import ConfigError
from jaxft.config.run import Config

_SCI = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _format(e: ValidationError, model=Config) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown key{_did_you_mean(err['loc'], model)}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and not isinstance(err["input"], dict):
            msg += f" (got {err['input']!r})"
        lines.append(f"config key {key!r}: {msg}" if key else f"config: {msg}")
    return "\n".join(lines)


def _did_you_mean(loc: tuple, model) -> str:
    """Walk the schema along `loc` and suggest the closest known key."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return ""
        model = field.annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"; did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))!r}?" if close else \
        f"; known keys here: {', '.join(model.model_fields)}"


def _field(parts: list[str]):
    """The schema field at a dotted key (`['data', 'train']`), or None when there is none."""
    model = Config
    for p in parts[:-1]:
        field = model.model_fields.get(p)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return model.model_fields.get(parts[-1])


def _is_string(field) -> bool:
    """A `str` or `str | None` field: its override value is taken as written, not parsed as YAML."""
    args = typing.get_args(field.annotation) or (field.annotation,)
    return str in args and all(a in (str, type(None)) for a in args)


def apply_override(tree: dict, item: str) -> None:
    """`optim.lr=3e-5` → tree['optim']['lr'] = 3e-5 (the value is parsed as YAML).

    A string key (`data.train=*.tsv`, `data.text_field=@x`, a Jinja `data.chat_template={% ... %}`) keeps the
    value as written unless YAML reads it as a string or null (`data.validation=null`); any other key whose
    value is not valid YAML (`train.steps=[1`) is a `ConfigError` naming the key.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: the key {key!r} has an empty part")
    field = _field(parts)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as e:
        if field is not None and not _is_string(field):
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config key {key.strip()!r}: {raw!r} is not valid YAML ({problem})") from None
        value = raw  # a string key keeps it; an unknown key is reported as such by validation
    if field is not None and _is_string(field):
        if not isinstance(value, str) and not (value is None and raw.strip() in ("", "~", "null", "Null", "NULL")):
            value = raw
    elif isinstance(value, str) and _SCI.fullmatch(value):  # YAML 1.1 reads 3e-5 as a string
        value = float(value)
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read YAML (or start from `base`), apply overrides, validate. Raises `ConfigError` naming the key."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; give the path of a YAML file")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} cannot be read: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    for item in overrides:
        apply_override(tree, item)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (a temporary file renamed over `path`): a crash mid-write
    leaves the previous file, never a cut one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)
