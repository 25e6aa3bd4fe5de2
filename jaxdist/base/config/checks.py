"""Validating a config: every value has its field's type, and one that makes sense.

`validate` is what every path into a run (the command line, a saved config, a config
changed in Python) passes through; `jaxdist.base.config` calls it after applying overrides.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal

from jaxdist.base.errors import UserError, at_least

Config = Any  # a jaxdist.base.config.Config (not imported: that module imports this one)

# The step counter is an int32 on the devices.
MAX_STEPS = 2**31 - 1


def _non_finite_floats(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys of float leaves that are NaN or infinite."""
    found = []
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found.extend(_non_finite_floats(value, key + "."))
        elif isinstance(value, float) and not math.isfinite(value):
            found.append(f"{key}={value}")
    return found


def _type_errors(node: Any, prefix: str = "") -> list[str]:
    """One message per leaf whose value does not have its field's type (a Literal's choices).

    The command line parses values by type; this catches a config changed in Python or read
    from a file, on every path into a run.
    """
    found = []
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found.extend(_type_errors(value, key + "."))
        elif f.name in hints and not _has_type(value, hints[f.name]):
            found.append(f"{key}={value!r} is not {_type_words(hints[f.name])}")
    return found


def _has_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    return True  # a type the command line cannot set either: the experiment's own business


def _type_words(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "allowed; choose one of: " + ", ".join(map(str, typing.get_args(hint)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_words(option).removeprefix("a ").removeprefix("an ")
                           for option in typing.get_args(hint))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "none"}.get(hint, str(hint))


PROFILE_FORM = re.compile(r"^(\d+):(\d+)$")


def profile_window(value: str) -> tuple[int, int] | None:
    """The (first, last) steps `train.profile_steps` names, None for ""; one line if bad."""
    if not value:
        return None
    match = PROFILE_FORM.match(value.strip())
    if match is None or int(match[1]) < 1 or int(match[2]) < 1:
        raise UserError(f"train.profile_steps={value} is not START:COUNT with START and COUNT "
                        f">= 1 (e.g. train.profile_steps=10:5 profiles steps 10 to 14); or "
                        f"leave it empty")
    first = int(match[1])
    return first, first + int(match[2]) - 1


def validate(config: Config) -> None:
    """Check that every value has its type, and values that have one but make no sense."""
    for bad in _type_errors(config)[:1]:
        raise UserError(bad)
    for bad in _non_finite_floats(config)[:1]:
        raise UserError(f"{bad} must be a finite number")
    t, o, p = config.train, config.optimizer, config.parallel
    checks = [
        (0 < t.steps <= MAX_STEPS, f"train.steps={t.steps} must be in [1, {MAX_STEPS}] (the "
                                   f"step counter is a 32-bit integer)"),
        (0 <= t.seed < 2**32, f"train.seed={t.seed} must be in [0, 2^32)"),
        (t.batch_size >= 0, f"train.batch_size={t.batch_size} must be > 0, or full"),
        (t.log_every > 0, f"train.log_every={t.log_every} must be > 0"),
        (o.learning_rate > 0, f"optimizer.learning_rate={o.learning_rate} must be > 0"),
        (0 <= o.momentum < 1, f"optimizer.momentum={o.momentum} must be in [0, 1)"),
        _minimum(config, "optimizer.weight_decay", 0),
        _minimum(config, "optimizer.warmup_steps", 0),
        (o.decay_steps >= 0, f"optimizer.decay_steps={o.decay_steps} must be >= 0 (0: the "
                             f"run's train.steps)"),
        (0 <= o.final_fraction <= 1,
         f"optimizer.final_fraction={o.final_fraction} must be in [0, 1]"),
        (o.step_factor > 0, f"optimizer.step_factor={o.step_factor} must be > 0"),
        _minimum(config, "train.early_stopping.min_delta", 0),
        (p.devices >= 0, f"parallel.devices={p.devices} must be > 0, or all"),
        _minimum(config, "loader.prefetch", 1),
        _minimum(config, "train.eval_every", 0),
        _minimum(config, "train.grad_accum", 1),
        (o.schedule != "step" or o.step_every > 0,
         "optimizer.schedule=step needs optimizer.step_every > 0"),
        _minimum(config, "optimizer.clip_norm", 0),
        _minimum(config, "train.checkpoint_every", 0),
        _minimum(config, "train.max_nonfinite", 0),
        _minimum(config, "train.early_stopping.patience", 0),
        _minimum(config, "checkpoint.keep", 1),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    profile_window(t.profile_steps)


def _minimum(config: Config, key: str, minimum: float) -> tuple[bool, str]:
    """Whether the value at `key` is at least `minimum`, and the message if it is not."""
    value = config
    for name in key.split("."):
        value = getattr(value, name)
    return value >= minimum, at_least(f"{key}={value}", minimum)
