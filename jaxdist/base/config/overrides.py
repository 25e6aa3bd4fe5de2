"""`KEY=VALUE` command-line overrides, parsed by each leaf's type annotation.

`train.steps=abc` or `parallel.backend=gpu` is refused with a message that says what is
accepted; an unknown key with the closest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from jaxdist.base.config.checks import validate
from jaxdist.base.config.sections import ALIASES, Config
from jaxdist.base.errors import UserError, choose_one_of


def leaf_keys(config: Any, prefix: str = "") -> list[str]:
    """List every overridable dotted key of a config tree, e.g. `train.steps`."""
    keys = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            keys.extend(leaf_keys(value, path + "."))
        elif value is not None:
            keys.append(path)
    return keys


def describe_keys(config: Any, prefix: str = "") -> list[str]:
    """One line per overridable key: `key  type  default` (for `EXPERIMENT --help`).

    A default that an alias names (`parallel.devices` 0) is shown by the alias (`all`).
    """
    lines = []
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, key = getattr(config, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines.extend(describe_keys(value, key + "."))
        elif value is not None:
            aliases = f.metadata.get(ALIASES) or {}
            shown = next((word for word, meant in aliases.items() if meant == value), value)
            lines.append(f"{key:36s} {_type_name(hints[f.name], aliases or None):28s} {shown}")
    return lines


def _type_name(hint: Any, aliases: dict[str, Any] | None) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        name = "|".join(str(choice) for choice in typing.get_args(hint))
    elif origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        name = _type_name(args[0], None) + " or none"
    else:
        name = getattr(hint, "__name__", str(hint))
    return name + (f" (or {', '.join(aliases)})" if aliases else "")


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Return a copy of `config` with each `key=value` override applied and validated.

    A key given twice is refused: which one was meant is the user's to say.
    """
    config = deep_copy(config)
    given: dict[str, str] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise UserError(f"override {item!r} is not KEY=VALUE; write e.g. train.steps=200")
        if key in given:
            raise UserError(f"{key} is given twice ({key}={given[key]}, then {key}={raw}); "
                            f"give it once")
        given[key] = raw
        _set_leaf(config, key, raw)
    validate(config)
    return config


def check_core_overrides(overrides: list[str]) -> None:
    """Refuse (one line) an override of a core section whose key or value cannot be.

    The command line calls this before it imports the experiment (which imports jax and
    its model library: seconds): a typo such as `train.stpes=10` is told at once. Only
    each key and its value's type are checked here, against the core sections' fields;
    `model.` and `data.` keys, and the checks of values against each other, wait for the
    experiment's config (`apply_overrides`).
    """
    from jaxdist.base.config.sections import Config

    config = Config()
    core = {f.name for f in dataclasses.fields(config)} - {"model", "data"}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if sep and key.split(".")[0] in core:
            _set_leaf(config, key, raw.strip())


def deep_copy(config: Any) -> Any:
    """A copy of a config tree whose sections are copies too."""
    if not dataclasses.is_dataclass(config):
        return config
    values = {f.name: deep_copy(getattr(config, f.name)) for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **values)


def _set_leaf(config: Config, key: str, raw: str) -> None:
    node: Any = config
    parts = key.split(".")
    for depth, name in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(
            node) else {}
        if name not in fields:
            raise UserError(unknown_key_message(config, key))
        f = fields[name]
        value = getattr(node, name)
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(value):
                raise UserError(f"{key} is a section; set one of its keys, e.g. "
                                f"{leaf_keys(value, key + '.')[0]}=...")
            hint = typing.get_type_hints(type(node))[name]
            setattr(node, name, parse_value(key, raw, hint, f.metadata.get(ALIASES, {})))
        else:
            node = value


def unknown_key_message(config: Config, key: str) -> str:
    """The message for a key `config` does not have, naming the closest one it has."""
    known = leaf_keys(config)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"
    return f"unknown config key {key!r}; {hint}"


def parse_value(key: str, raw: str, hint: Any, aliases: dict[str, Any] | None = None) -> Any:
    """Parse the text `raw` given for `key` as a value of type `hint`."""
    if aliases and raw.lower() in aliases:
        return aliases[raw.lower()]
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if raw not in choices:
            raise UserError(choose_one_of(f"{key}={raw}", choices, "is not allowed"))
        return raw
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw.lower() in ("none", "null"):
            return None
        return parse_value(key, raw, args[0], aliases)
    alias_words = f" (or {', '.join(aliases)})" if aliases else ""
    if hint is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise UserError(f"{key}={raw} is not a boolean; write true or false")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise UserError(f"{key}={raw} is not an integer; write e.g. {key}=100"
                            f"{alias_words}") from None
    if hint is float:
        try:
            return float(raw)
        except ValueError:
            raise UserError(f"{key}={raw} is not a number; write e.g. {key}=0.1") from None
    if hint is str:
        return raw
    raise UserError(f"{key} cannot be set from the command line (type {hint})")
