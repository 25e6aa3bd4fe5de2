"""Typed experiment configuration.

Its sections, `KEY=VALUE` overrides, JSON, validation and the keys a resumed run may change.
The names below are the package's public ones.
"""

from jaxdist.config.checks import MAX_STEPS, validate
from jaxdist.config.sections import (
    ALIASES,
    EXPERIMENT_DIGEST_KEY,
    EXPERIMENT_KEY,
    RESUMABLE_KEYS,
    CheckpointConfig,
    Config,
    EarlyStoppingConfig,
    LoaderConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainConfig,
    apply_overrides,
    check_allowed_changes,
    describe_keys,
    flatten,
    from_dict,
    leaf_keys,
    parse_value,
    resume_conflicts,
    to_dict,
    to_json,
)

__all__ = [
    "ALIASES", "EXPERIMENT_DIGEST_KEY", "EXPERIMENT_KEY", "MAX_STEPS", "RESUMABLE_KEYS",
    "CheckpointConfig", "Config", "EarlyStoppingConfig", "LoaderConfig", "OptimizerConfig",
    "ParallelConfig", "TrainConfig", "apply_overrides", "check_allowed_changes",
    "describe_keys", "flatten", "from_dict", "leaf_keys", "parse_value", "resume_conflicts",
    "to_dict", "to_json", "validate",
]
