"""A config as `config.json` saves it, read back, and the keys a resumed run may change."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from jaxdist.base.config.checks import validate
from jaxdist.base.config.overrides import deep_copy, leaf_keys, unknown_key_message
from jaxdist.base.config.sections import Config
from jaxdist.base.errors import UserError


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
    config = deep_copy(template)
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


# Keys that only change how long a run goes, how often it logs, evaluates or saves, where it
# runs, which trackers it reports to or which steps it profiles: a run may resume from a
# checkpoint written with other values of these.
RESUMABLE_KEYS = (
    "train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.max_nonfinite", "train.early_stopping.", "checkpoint.", "parallel.backend",
    "parallel.devices", "parallel.shard", "loader.prefetch", "train.skip_with", "train.log_norms",
    "tracking.", "train.profile_steps", "train.profile_all_processes",
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
            raise UserError(unknown_key_message(config, key).replace(
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


