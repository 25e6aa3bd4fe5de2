"""Typed experiment configuration and `key=value` command-line overrides.

A config is a tree of dataclasses. The core sections (`train`, `optimizer`, `parallel`) are
defined here; an experiment may add its own dataclasses under `model` and `data`. Every leaf
has a type annotation, and an override is parsed by that type, so `train.steps=abc` or
`parallel.backend=gpu` is refused with a message that says what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from jaxdist.base.errors import UserError, choose_one_of
from jaxdist.config.checks import validate

# Field metadata key: words accepted in place of a value, e.g. {"full": 0} for batch_size.
ALIASES = "aliases"


@dataclass
class EarlyStoppingConfig:
    """Stop when an evaluation metric has not improved for `patience` evaluations."""

    patience: int = 0  # 0 turns early stopping off
    metric: str = "loss"  # a key of the eval split's logged metrics
    mode: Literal["min", "max"] = "min"
    min_delta: float = 0.0  # smaller improvements do not count


@dataclass
class TrainConfig:
    """How long to train, and how often to report, evaluate and save."""

    steps: int = 100
    # Global batch over all devices; 0 (or "full") means the whole training set every step.
    batch_size: int = field(default=0, metadata={ALIASES: {"full": 0}})
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 1000  # a checkpoint is also saved at the end and on preemption
    # A step whose global gradient is not finite is skipped on every device; this many in a
    # row stop the run with an error (0 never stops it).
    max_nonfinite: int = 10
    skip_nonfinite: bool = True
    # How a skipped step keeps the state: cond (a branch; the finite path touches nothing
    # extra) or where (a select over every parameter; no branch). Bit-identical results.
    skip_with: Literal["cond", "where"] = "cond"
    # bf16: compute in bfloat16, keep params and optimizer state in float32.
    precision: Literal["fp32", "bf16"] = "fp32"
    # Split each device's batch into this many micro-batches, one update for all of them.
    grad_accum: int = 1
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class OptimizerConfig:
    """Which optax transformation updates the parameters, and its learning-rate schedule."""

    name: Literal["sgd", "momentum", "adam", "adamw", "lamb"] = "sgd"
    learning_rate: float = 0.1  # the peak rate of a schedule
    momentum: float = 0.9
    weight_decay: float = 0.0
    # constant; warmup_cosine: linear warmup, then cosine decay to final_fraction * rate;
    # step: multiply the rate by step_factor every step_every steps.
    schedule: Literal["constant", "warmup_cosine", "step"] = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0  # 0: decay over train.steps
    final_fraction: float = 0.0
    step_every: int = 0
    step_factor: float = 0.1
    clip_norm: float = 0.0  # global-norm gradient clipping; 0 turns it off


@dataclass
class ParallelConfig:
    """How the per-device step is mapped over devices and how gradients are combined."""

    backend: Literal["pmap", "shard_map"] = "pmap"
    grad_reduce: Literal["mean", "sum"] = "mean"
    # ZeRO: what is split over the devices instead of copied on each (jaxdist.parallel.layout):
    # none; optimizer (its state); gradients (and the reduced gradient); params (all three).
    shard: Literal["none", "optimizer", "gradients", "params"] = "none"
    # How many local devices to use; 0 (or "all") means every local device.
    devices: int = field(default=0, metadata={ALIASES: {"all": 0}})


@dataclass
class LoaderConfig:
    """How training examples are ordered and fed to the devices."""

    shuffle: bool = True
    # Skip the incomplete last batch of an epoch; false pads it with weight-0 rows instead.
    drop_remainder: bool = True
    # balanced: draw examples with replacement so that every class (by label_key) is equally
    # likely; uniform: every example once per epoch.
    sampling: Literal["uniform", "balanced"] = "uniform"
    label_key: str = "label"
    prefetch: int = 2  # batches kept placed on the devices ahead of the step


@dataclass
class CheckpointConfig:
    """Which checkpoints are kept."""

    keep: int = 3  # the most recent ones kept, besides the best
    best_metric: str = "loss"  # eval metric that picks the best checkpoint; "" for none
    best_mode: Literal["min", "max"] = "min"
    # Write checkpoints in a background thread while training goes on (the state is first
    # copied to host memory, so a save holds one extra copy of it there until written).
    background: bool = True


@dataclass
class Config:
    """A whole experiment configuration: core sections plus the experiment's own."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    model: Any = None
    data: Any = None


def to_dict(config: Config) -> dict[str, Any]:
    """Return the config as plain JSON-able nested dicts."""
    return dataclasses.asdict(config)


# The keys of `config.json` that name the experiment (how to load it again) and, for an
# experiment file, the sha256 of the file that trained the run, beside the config.
EXPERIMENT_KEY = "experiment"
EXPERIMENT_DIGEST_KEY = "experiment_sha256"


def to_json(config: Config, experiment: str = "", digest: str | None = None) -> str:
    """Return the config as indented JSON, the form saved to `config.json`.

    `experiment` (a bundled name or a file path) is saved beside it under "experiment",
    and `digest` (the sha256 of an experiment file) under "experiment_sha256".
    """
    data = to_dict(config)
    if experiment:
        data[EXPERIMENT_KEY] = experiment
    if digest:
        data[EXPERIMENT_DIGEST_KEY] = digest
    return json.dumps(data, indent=2, sort_keys=True)


def from_dict(template: Config, data: Mapping[str, Any]) -> Config:
    """`template` (an experiment's `config()`) with every value `data` (a saved config) holds.

    Keys the template does not have are ignored; those `data` lacks keep their defaults.
    """
    config = _deep_copy(template)
    saved = flatten(data)
    for key in leaf_keys(config):
        if key not in saved:
            continue
        *path, name = key.split(".")
        node = config
        for part in path:
            node = getattr(node, part)
        value = saved[key]
        current = getattr(node, name)
        if isinstance(current, float) and isinstance(value, int):
            value = float(value)
        setattr(node, name, value)
    validate(config)
    return config


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
    """One line per overridable key: `key  type  default` (for `EXPERIMENT --help`)."""
    lines = []
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, key = getattr(config, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines.extend(describe_keys(value, key + "."))
        elif value is not None:
            lines.append(f"{key:36s} {_type_name(hints[f.name], f.metadata.get(ALIASES)):28s} "
                         f"{value}")
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
    config = _deep_copy(config)
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


# Keys that only change how long a run goes, how often it logs, evaluates or saves, or where
# it runs: a run may resume from a checkpoint written with other values of these.
RESUMABLE_KEYS = (
    "train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.max_nonfinite", "train.early_stopping.", "checkpoint.", "parallel.backend",
    "parallel.devices", "parallel.shard", "loader.prefetch", "train.skip_with",
)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one dict of dotted keys."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_conflicts(saved: Mapping[str, Any], current: Config,
                     allowed: Sequence[str] = ()) -> list[str]:
    """The keys, with both values, where `current` may not differ from a saved config.

    `allowed` names further keys that may differ (the user said so, e.g. a lower learning
    rate after a run diverged).
    """
    old, new = flatten(saved), flatten(to_dict(current))
    check_allowed_changes(current, allowed, set(old))
    conflicts = []
    for key in sorted(set(old) | set(new)):
        if (key.startswith(RESUMABLE_KEYS) or key in RESUMABLE_KEYS or key in allowed
                or key in (EXPERIMENT_KEY, EXPERIMENT_DIGEST_KEY)):  # checked apart
            continue
        if key not in old and new.get(key) == _default(current, key):
            continue  # a key added since that run was saved, at its default
        if old.get(key, "(absent)") != new.get(key, "(absent)"):
            conflicts.append(f"{key}={old.get(key, '(absent)')} there, "
                             f"{new.get(key, '(absent)')} now")
    return conflicts


def check_allowed_changes(config: Config, allowed: Sequence[str],
                          saved_keys: set[str] = frozenset()) -> None:
    """Refuse an `--allow-change` key that is not a key of `config` (nor of a saved one)."""
    known = set(leaf_keys(config)) | saved_keys
    for key in allowed:
        if key not in known:
            raise UserError(_unknown_key_message(config, key).replace(
                "unknown config key", "--allow-change names an unknown config key"))


def _default(config: Config, key: str) -> Any:
    """The default of the config field `key` (a dotted path), or a marker if it has none."""
    node: Any = config
    *parents, name = key.split(".")
    for part in parents:
        node = getattr(node, part, None)
    fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(
        node) else {}
    if name not in fields:
        return _NO_DEFAULT
    f = fields[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _NO_DEFAULT


_NO_DEFAULT = object()


def _deep_copy(config: Any) -> Any:
    if not dataclasses.is_dataclass(config):
        return config
    values = {f.name: _deep_copy(getattr(config, f.name)) for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **values)


def _set_leaf(config: Config, key: str, raw: str) -> None:
    node: Any = config
    parts = key.split(".")
    for depth, name in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(
            node) else {}
        if name not in fields:
            raise UserError(_unknown_key_message(config, key))
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


def _unknown_key_message(config: Config, key: str) -> str:
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
